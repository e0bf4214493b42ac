"""What a search costs, stage by stage: `oaq-search run` from a cold cache and again warm, per model.

Each run is a fresh process on a study written from the quickstart's (weight budget at --bits average
bits, --trials trials, no fine-tune), with its own empty cache folder (cold) and then the same folder
again with a new study (warm: sensitivity measurements reused). Stage times are the run's own
(plan.json metadata), wall time is the whole process. `--source` runs another checkout's code (e.g. a
`git worktree` of the commit before a change) in the same session, so a speed-up is a ratio in one run.

    python benchmarks/search_cost.py --models resnet20 resnet56 --source before=/tmp/before now=.
    python benchmarks/search_cost.py --models resnet56 --caches cold --source before=/tmp/before now=. --tag r56
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPOSITORY, SHARED, checkpoint, write_results
from search_quality import budget_bytes

from oaq_search.config import dump_study_config, load_study_config

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
    _write(rows, args)


def _run(model: str, source: Path, scratch: Path, state: str, args) -> dict:
    """One `oaq-search run` in a fresh process; its stage seconds, wall time and test accuracy."""
    config = load_study_config(REPOSITORY / "studies" / "quickstart.toml")
    config.name, config.output_dir = f"cost-{model}-{state}", str(scratch / state)
    config.model.name, config.model.checkpoint = model, str(checkpoint(model))
    config.data.root = str(SHARED / "data" / "cifar10")
    config.search.n_trials, config.finetune.mode = args.trials, "none"
    config.budget = {"memory": f"{budget_bytes(model, args.bits) / 1024:.1f}KiB"}
    path = scratch / f"{state}.toml"
    path.write_text(dump_study_config(config))
    environment = {**os.environ, "OAQ_CACHE_DIR": str(scratch / "cache"), "PYTHONPATH": str(source)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "oaq_search", "run", str(path)], cwd=source, env=environment, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    metadata = json.loads((scratch / state / "plan.json").read_text())["metadata"]
    return {"wall_s": wall, **{stage: metadata["seconds"].get(stage, 0.0) for stage in STAGES},
            "test_accuracy": metadata["test_accuracy"], "fp_test_accuracy": metadata["fp_test_accuracy"]}


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
    print(text)
    print(f"written to {write_results('search_cost_' + (args.tag or '_'.join(args.models)), rows, text)}")


if __name__ == "__main__":
    main()
