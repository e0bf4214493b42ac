"""W4A4 scale fine-tuning of ResNet-20, 3 epochs, over a grid of settings: can any reach FP - 0.3?

Each setting is one `finetune_resnet20.py --part scale --settings W4A4 --epochs 3` run, with
`--finetune` overrides, started --jobs at a time (one torch thread each) and writing its own
results file; then one table gathers them. `--gather` only rebuilds the table from those files.

    python benchmarks/finetune_sweep.py --jobs 12 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from _common import RESULTS, write_results
from finetune_resnet20 import results_name

# (train split, [finetune] overrides): the default, then one or two settings changed at a time.
GRID = [
    ("finetune", []),
    ("finetune", ["seed = 1"]),
    ("finetune", ["quantizer_learning_rate = 0.001"]),
    ("finetune", ["quantizer_learning_rate = 0.003"]),
    ("finetune", ["quantizer_learning_rate = 0.03"]),
    ("finetune", ["learning_rate = 0.003"]),
    ("finetune", ["learning_rate = 0.01"]),
    ("finetune", ["learning_rate = 0.01", "quantizer_learning_rate = 0.003"]),
    ("finetune", ["distill = false"]),
    ("finetune", ["learn_activation_ranges = false"]),
    ("finetune", ["batch_size = 256", "learning_rate = 0.003"]),
    ("finetune", ["batch_size = 256", "learning_rate = 0.003", "seed = 1"]),
    ("finetune", ["batch_size = 256", "learning_rate = 0.003", "quantizer_learning_rate = 0.003"]),
    ("finetune", ["batch_size = 256", "learning_rate = 0.01"]),
    ("finetune", ["batch_size = 512", "learning_rate = 0.01"]),
    ("all", []),
    ("all", ["learning_rate = 0.01"]),
    ("all", ["learning_rate = 0.01", "quantizer_learning_rate = 0.003"]),
    ("all", ["batch_size = 256", "learning_rate = 0.003"]),
    ("all", ["batch_size = 256", "learning_rate = 0.003", "quantizer_learning_rate = 0.003"]),
    ("all", ["batch_size = 256", "learning_rate = 0.01"]),
    ("all", ["batch_size = 256", "learning_rate = 0.01", "quantizer_learning_rate = 0.003"]),
]
SCRIPT = Path(__file__).resolve().parent / "finetune_resnet20.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each one torch thread)")
    parser.add_argument("--device", default="auto", help="the fine-tunes' device: auto, cpu, cuda")
    parser.add_argument("--gather", action="store_true", help="only rebuild the table from the runs' files")
    args = parser.parse_args()
    if not args.gather:
        run_grid(args.jobs, args.device)
    gather()


def command(train_split: str, overrides: list[str], device: str) -> list[str]:
    lines = [f'device = "{device}"', *overrides]
    return [sys.executable, str(SCRIPT), "--part", "scale", "--settings", "W4A4", "--epochs", "3",
            "--train-split", train_split, *[part for line in lines for part in ("--finetune", line)]]


def run_grid(jobs: int, device: str) -> None:
    running: list[subprocess.Popen] = []
    for train_split, overrides in GRID:
        while len(running) >= jobs:
            running.pop(0).wait()
        running.append(subprocess.Popen(command(train_split, overrides, device), env={**os.environ, "OMP_NUM_THREADS": "1"}))
    for process in running:
        process.wait()


def run_file(train_split: str, overrides: list[str]) -> Path:
    """The results file of one grid run, named the way finetune_resnet20.py names it."""
    parsed = argparse.Namespace(part="scale", settings=["W4A4"], train_split=train_split,
                                overrides=tomllib.loads("\n".join(overrides)))
    return RESULTS / f"{results_name(parsed)}.json"


def gather() -> None:
    rows = []
    for train_split, overrides in GRID:
        path = run_file(train_split, overrides)
        if not path.is_file():
            print(f"missing: {path.name} (run the grid first)")
            continue
        run = json.loads(path.read_text())
        row = run["rows"][0]
        rows.append({"train_split": train_split, "overrides": overrides, "command": run["command"],
                     "machine": run["machine"], "fp_accuracy": row["fp_accuracy"], "ptq_change": row["ptq_change"],
                     "finetuned_change": row["finetuned_change"], "finetune_s": row["finetune_s"],
                     "search_accuracy": [epoch["search_accuracy"] for epoch in row["history"]]})
    lines = ["| train split | changed from the defaults | search split after each epoch | test change | fine-tune s |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['train_split']} | {', '.join(r['overrides']) or 'defaults'} | "
                     f"{' / '.join(f'{a:.2f}' for a in r['search_accuracy'])} | {r['finetuned_change']:+.2f} | "
                     f"{r['finetune_s']:.0f} |")
    if rows:
        best = max(rows, key=lambda r: r["finetuned_change"])
        lines += ["", f"W4A4 post-training {rows[0]['ptq_change']:+.2f} against FP {rows[0]['fp_accuracy']:.2f} %; "
                      f"best after 3 epochs {best['finetuned_change']:+.2f}; the goal is -0.30. Fine-tune seconds "
                      f"are with the other runs sharing the machine. The runs' machines: "
                      + "; ".join(sorted({f"{r['machine']['cpu']}, GPU {r['machine'].get('gpu')}, torch "
                                          f"{r['machine']['torch']}" for r in rows})) + "."]
    write_results("finetune_scale_sweep_resnet20_w4a4", rows, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
