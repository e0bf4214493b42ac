"""The example's own model (examples/own_model: MobileNetV2-style, not in the registry) through a study
file: post-training uniform OAQ at 8/4/3 bits and the search at each budget, on its class folders.

Writes the ImageFolder copy of ../shared CIFAR-10 first (the last 5,000 training images, which its
reference checkpoint never trained on, and the whole test set), then runs the example's study file
with each budget. Accuracy is on the test split, as change against the same checkpoint's FP.

    python benchmarks/own_model.py --folder /tmp/own --budgets 40KiB 32KiB 28KiB --trials 24
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from _common import REPOSITORY, SHARED, write_results

from hwmodels import MemoryModel
from oaq_search.config import load_study_config
from oaq_search.engine import open_study, run_trials
from oaq_search.evaluate import accuracy
from oaq_search.graph import build_layer_graph
from oaq_search.pipeline import finish_study, load_study_data, load_study_model, prepare
from oaq_search.planning import PlanFactory
from oaq_search.ptq import CALIBRATION_IMAGES, post_training_quantize

EXAMPLE = REPOSITORY / "examples" / "own_model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="runs/own-model-benchmark", help="class folders and studies go here")
    parser.add_argument("--budgets", nargs="+", default=["40KiB", "32KiB", "28KiB"])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3])
    args = parser.parse_args()
    folder = Path(args.folder)
    if not (folder / "data" / "test").is_dir():
        subprocess.run([sys.executable, str(EXAMPLE / "make_imagefolder.py"), "--out", str(folder / "data"),
                        "--data-root", str(SHARED / "data" / "cifar10"), "--train", "5000", "--test", "10000"],
                       check=True)
    config = load_study_config(EXAMPLE / "study.toml")
    config.model.checkpoint = str(REPOSITORY / config.model.checkpoint)
    config.data.root = str(folder / "data")
    started = time.perf_counter()
    model = load_study_model(config.model, EXAMPLE)
    splits = load_study_data(config.data, EXAMPLE)
    graph = build_layer_graph(model, splits.input_shape)
    fp = accuracy(model, splits.test)
    calibration = next(splits.search.batches(CALIBRATION_IMAGES))[0]
    factory = PlanFactory(config.model.label, model, graph, calibration=calibration)
    rows = [{"plan": "full precision", "kib": MemoryModel().evaluate(graph, factory.uniform(8)).totals[
        "weight_bytes"] * 4 / 1024, "test": fp, "change": 0.0, "seconds": time.perf_counter() - started}]
    for bits in args.bits:
        started = time.perf_counter()
        plan = factory.uniform(bits)
        test = accuracy(post_training_quantize(model, plan, splits.search), splits.test)
        rows.append({"plan": f"uniform OAQ W{bits}", "kib": MemoryModel().evaluate(graph, plan).totals["weight_bytes"] / 1024,
                     "test": test, "change": test - fp, "seconds": time.perf_counter() - started})
        print(rows[-1], flush=True)
    for budget in args.budgets:
        config.name, config.output_dir = f"own-{budget}", str(folder / f"study-{budget}")
        config.budget, config.search.n_trials = {"memory": budget}, args.trials
        started = time.perf_counter()
        engine = prepare(config)
        study, storage = open_study(engine, create=True)
        run_trials(engine, study, storage)
        result = finish_study(config, engine, study)
        rows.append({"plan": f"search <= {budget}", "kib": result.plan.totals["weight_bytes"] / 1024,
                     "test": result.test_accuracy, "change": result.test_accuracy - fp,
                     "seconds": time.perf_counter() - started, "stages": result.seconds,
                     "bits": {layer.name: layer.weight_bits for layer in result.plan.layers}})
        print({k: v for k, v in rows[-1].items() if k != "bits"}, flush=True)
    markdown = ("Own model (examples/own_model, MobileNetV2-style, 25 conv/linear layers, 87,114 parameters), "
                f"reference checkpoint `{Path(config.model.checkpoint).name}`; class folders of ../shared CIFAR-10 "
                f"({len(splits.search)} search-split images, {len(splits.test)} test images); post-training, "
                "8-bit first and last layers, float activations.\n\n"
                "| plan | weights (KiB) | test (%) | change vs FP | wall (s) |\n|---|---|---|---|---|\n"
                + "\n".join(f"| {r['plan']} | {r['kib']:.1f} | {r['test']:.2f} | {r['change']:+.2f} | {r['seconds']:.0f} |"
                            for r in rows))
    print(markdown)
    write_results("own_model", rows, markdown)


if __name__ == "__main__":
    main()
