"""What a search costs, stage by stage: `oaq-search run` from a cold cache and again warm, per model.

Each run is a fresh process on a study written from the quickstart's (weight budget at --bits average
bits, --trials trials, no fine-tune), with its own empty cache folder (cold) and then the same folder
again with a new study (warm: sensitivity measurements reused). Stage times are the run's own
(plan.json metadata), wall time is the whole process. `--source` runs another checkout's code (e.g. a
`git worktree` of the commit before a change) in the same session, so a speed-up is a ratio in one run.
Models: the registry's (ResNet-110 has no trained checkpoint here: it runs untrained, for its stage
times alone) and tiny_mobilenet, the own-model example's depthwise network, through its factory.

    python benchmarks/search_cost.py --models resnet20 resnet56 --source before=/tmp/before now=.
    python benchmarks/search_cost.py --models resnet56 --caches cold --source before=/tmp/before now=. --tag r56
    python benchmarks/search_cost.py --models tiny_mobilenet densenet100 resnet110 --tag growth
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import tomli_w
import torch
from _common import REPOSITORY, SHARED, checkpoint, write_results
from deploy_onnx import _model
from search_quality import graph_budget_bytes

from oaq_search.graph import build_layer_graph
from oaq_search.pipeline import load_model

STAGES = ("setup", "sensitivity", "measured sensitivity", "seeds", "search", "finalists", "test")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20"])
    parser.add_argument("--bits", type=float, default=3.0)
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--source", nargs="+", default=[f"now={REPOSITORY}"],
                        help="label=checkout folder whose oaq_search runs (default: this one)")
    parser.add_argument("--caches", nargs="+", choices=("cold", "warm"), default=["cold", "warm"],
                        help="warm runs after a cold one in the same cache folder")
    parser.add_argument("--tag", help="results file name after search_cost_ (default: the models)")
    args = parser.parse_args()
    sources = dict(item.split("=", 1) for item in args.source)
    rows = []
    for model in args.models:
        for label, folder in sources.items():
            with tempfile.TemporaryDirectory() as scratch:
                for state in args.caches:
                    rows.append({"model": model, "code": label, "cache": state,
                                 **_run(model, Path(folder).resolve(), Path(scratch), state, args)})
                    print(rows[-1], flush=True)
                    _write(rows, args)  # after every run: what finished is kept if a long one is stopped


def _run(model: str, source: Path, scratch: Path, state: str, args) -> dict:
    """One `oaq-search run` in a fresh process; its stage seconds, wall time and test accuracy. The study
    is the source's own quickstart file with these keys changed, so older checkouts read it too."""
    config = tomllib.loads((source / "studies" / "quickstart.toml").read_text())
    table, network = _model_table(model)
    budget = graph_budget_bytes(build_layer_graph(network, (3, 32, 32)), args.bits)
    config.update(name=f"cost-{model}-{state}", output_dir=str(scratch / state), model=table,
                  budget={"memory": f"{budget / 1024:.1f}KiB"})
    config["data"]["root"] = str(SHARED / "data" / "cifar10")
    config["search"]["n_trials"], config["finetune"]["mode"] = args.trials, "none"
    path = scratch / f"{state}.toml"
    path.write_text(tomli_w.dumps(config))
    environment = {**os.environ, "OAQ_CACHE_DIR": str(scratch / "cache"), "PYTHONPATH": str(source)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "oaq_search", "run", str(path)], cwd=source, env=environment, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    metadata = json.loads((scratch / state / "plan.json").read_text())["metadata"]
    return {"wall_s": wall, **{stage: metadata["seconds"].get(stage, 0.0) for stage in STAGES},
            "test_accuracy": metadata["test_accuracy"], "fp_test_accuracy": metadata["fp_test_accuracy"]}


def _model_table(model: str) -> tuple[dict, torch.nn.Module]:
    """The study's [model] table and the network: a registry model with its checkpoint (untrained where
    there is none, as for ResNet-110: its stages are timed all the same), or the own-model example's
    depthwise network (tiny_mobilenet) by its factory."""
    if model == "tiny_mobilenet":
        return {"factory": "examples.own_model.model:build", "checkpoint": str(checkpoint(model))}, _model(model)
    trained = checkpoint(model).is_file()
    return ({"name": model, **({"checkpoint": str(checkpoint(model))} if trained else {})},
            load_model(model, checkpoint(model) if trained else None))


def _write(rows: list[dict], args) -> None:
    header = "| model | code | cache | wall (s) | " + " | ".join(STAGES) + " | test (change vs FP) |"
    table = [header, "|---|---|---|" + "---:|" * (len(STAGES) + 2)]
    for r in rows:
        table.append(f"| {r['model']} | {r['code']} | {r['cache']} | {r['wall_s']:.0f} | "
                     + " | ".join(f"{r[stage]:.1f}" for stage in STAGES)
                     + f" | {r['test_accuracy']:.2f} ({r['test_accuracy'] - r['fp_test_accuracy']:+.2f}) |")
    table.append(f"\n{args.bits:g} average weight bits (first and last layer at 8), {args.trials} trials, no "
                 "fine-tune; stage seconds from the run's plan, wall time of the whole process (imports, data).")
    text = "\n".join(table)
    print(f"written to {write_results('search_cost_' + (args.tag or '_'.join(args.models)), rows, text)}")


if __name__ == "__main__":
    main()
