"""Hardware-aware search under a latency budget: weights alone, or weights and input bits together?

On a target table whose cost grows with both widths (Bit Fusion's 2-bit bricks: a w x a MAC takes
ceil(w/2) * ceil(a/2) of them), a latency budget can be met by narrowing weights or inputs, layer by
layer. Under one latency budget (first and last layers at 8 bits, counted): every uniform W/A plan
that fits; the search over weight bits with every input at `--activation-bits`; and the search over
weight and input bits per tie group. Each post-training quantized, scored once on the test split.

    python benchmarks/latency_search.py --model resnet20 --target bitfusion --latency-us 60.9 --trials 40
    python benchmarks/latency_search.py --model resnet20 --target bitfusion --latency-us 80 --trials 40
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

from _common import SHARED, checkpoint, write_results
from search_quality import run, study_config

import hwmodels
from oaq_search.data import load_cifar10
from oaq_search.evaluate import accuracy
from oaq_search.pipeline import finish_study, layer_graph, load_model
from oaq_search.plan import Plan
from oaq_search.planning import PlanFactory
from oaq_search.ptq import CALIBRATION_IMAGES, post_training_quantize


def uniform_rows(model_name: str, target: str, latency_us: float) -> list[dict]:
    """Every uniform W/A plan the target runs (ends at 8 bits) within the budget, post-training test accuracy."""
    model = load_model(model_name, checkpoint(model_name))
    graph = layer_graph(model_name, model)
    splits = load_cifar10(SHARED / "data/cifar10")
    factory = PlanFactory(model_name, model, graph, calibration=next(splits.search.batches(CALIBRATION_IMAGES))[0])
    cost_model = hwmodels.get_cost_model(target)
    fp = accuracy(model, splits.test)
    rows = []
    for weight_bits, activation_bits in itertools.product(cost_model.legal_bits("conv2d", "weight_bits"),
                                                         cost_model.legal_bits("conv2d", "activation_bits")):
        plan = factory.uniform(weight_bits, activation_bits)
        totals = cost_model.evaluate(graph, plan).totals
        if totals["latency_s"] * 1e6 <= latency_us:
            rows.append({"plan": f"uniform W{weight_bits}A{activation_bits}", "fp_test": fp,
                         "test": accuracy(post_training_quantize(model, plan, splits.search), splits.test),
                         "latency_us": totals["latency_s"] * 1e6, "weight_kib": totals["weight_bytes"] / 1024})
    return rows


def search_row(kind: str, model: str, target: str, latency_us: float, trials: int, folder: Path, eval_images: int,
               activation_bits: int | list[int]) -> dict:
    legal = hwmodels.get_cost_model(target).legal_bits("conv2d", "weight_bits")
    config = study_config(f"latency-{target}-{kind}", model, 0, trials, folder, eval_images=eval_images,
                          weight_bits=legal, activation_bits=activation_bits, cost_model=target)
    config.budget = {"latency": f"{latency_us:.4f}us"}
    prepared, study = run(config)
    result = finish_study(config, prepared, study)
    seed_trial = next(t for t in study.trials if t.user_attrs.get("seed") == "integer_program")
    seed_plan = Plan.from_dict(seed_trial.user_attrs["plan"])
    return {"plan": kind, "test": result.test_accuracy, "fp_test": result.fp_test_accuracy,
            "latency_us": result.plan.totals["latency_s"] * 1e6, "weight_kib": result.plan.totals["weight_bytes"] / 1024,
            "integer_program_test": accuracy(post_training_quantize(prepared.model, seed_plan, prepared.splits.search),
                                             prepared.splits.test),
            "parameters": len(prepared.space.parameter_names),
            "settings_per_group": [len(s) for s in prepared.space.settings],
            "layers": {layer.name: layer.summary() for layer in result.plan.layers},
            "trials": len(study.trials), "seconds": prepared.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--target", default="bitfusion", help="a target table with latency per bit pair")
    parser.add_argument("--latency-us", type=float, default=80.0, help="the latency budget, microseconds")
    parser.add_argument("--activation-bits", type=int, default=4, help="every input's bits when only weights are searched")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--eval-images", type=int, default=1000)
    parser.add_argument("--folder", type=Path, help="studies' folder: an interrupted run resumes its studies")
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="oaq-latency-"))
    rows = uniform_rows(args.model, args.target, args.latency_us)
    inputs = hwmodels.get_cost_model(args.target).legal_bits("conv2d", "activation_bits")
    for kind, searched_inputs in (("weights searched", args.activation_bits), ("weights and inputs searched", inputs)):
        rows.append(search_row(kind, args.model, args.target, args.latency_us, args.trials, folder,
                               args.eval_images, searched_inputs))
        print(rows[-1], flush=True)
    lines = ["| plan | test % | change vs FP | integer-program seed | latency (us) | weights (KiB) | Optuna parameters |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        seed = f"{r['integer_program_test']:.2f} %" if "integer_program_test" in r else ""
        lines.append(f"| {r['plan']} | {r['test']:.2f} | {r['test'] - r['fp_test']:+.2f} | {seed} | "
                     f"{r['latency_us']:.1f} | {r['weight_kib']:.1f} | {r.get('parameters', '')} |")
    lines += ["", f"Budget: {args.latency_us:g} us on {args.target}; every uniform plan that fits is listed. Searched "
                  f"inputs at {args.activation_bits} bits, or per group from "
                  f"{inputs}; weights from the target's {hwmodels.get_cost_model(args.target).legal_bits('conv2d', 'weight_bits')}. "
                  f"{args.trials} trials each, {args.eval_images} search-split images per trial; post-training, test "
                  f"split; FP {rows[-1]['fp_test']:.2f} %."]
    write_results(f"latency_search_{args.model}_{args.target}_{args.latency_us:g}us", rows, "\n".join(lines))


if __name__ == "__main__":
    main()
