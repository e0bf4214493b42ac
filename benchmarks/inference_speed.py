"""How fast quantized models run inference on this CPU, by input layout and batch size, and what
one search trial costs end to end.

Inference is most of a search trial (BatchNorm correction's pass over the calibration batch, then
scoring the search split) and all of measured sensitivity. Per model: a uniform OAQ W3A4 plan,
post-training quantized; images/s over the search split in NCHW and in channels_last (the layout
`oaq_search.layout` feeds models), per batch size. Then the quickstart study's trial: apply a plan
(quantize, calibrate, correct BN) and score it on `eval_images`, median of repeats, and the measured
group sensitivity computed before its search.

    python benchmarks/inference_speed.py [--part layout|trial|all] [--images 1000] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from unittest.mock import patch

import torch
from _common import SHARED, checkpoint, write_results

from hwmodels.measure import median_seconds
from oaq_search.config import load_study_config
from oaq_search.data import load_cifar10
from oaq_search.pipeline import layer_graph, load_model, prepare
from oaq_search.planning import PlanFactory
from oaq_search.ptq import post_training_quantize
from oaq_search.cache import CACHE_ENV

LAYOUTS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}
BATCH_SIZES = (25, 50, 100, 250, 500)
QUICKSTART = Path(__file__).resolve().parents[1] / "studies" / "quickstart.toml"


def layout_rows(images: int, repeats: int) -> list[dict]:
    splits = load_cifar10(SHARED / "data" / "cifar10")
    batch = next(splits.search.batches(images))[0]
    rows = []
    for name in ("resnet20", "resnet56"):
        model = load_model(name, checkpoint(name))
        plan = PlanFactory(name, model, layer_graph(name, model)).uniform(3, activation_bits=4)
        quantized = post_training_quantize(model, plan, splits.search).eval()
        for layout, memory_format in LAYOUTS.items():
            inputs = batch.contiguous(memory_format=memory_format)
            for batch_size in BATCH_SIZES:
                def run():
                    with torch.inference_mode():
                        for start in range(0, images, batch_size):
                            quantized(inputs[start:start + batch_size])
                seconds = median_seconds(run, repeats)
                rows.append({"part": "layout", "model": name, "layout": layout, "batch_size": batch_size,
                             "images_per_second": images / seconds})
                print(rows[-1], flush=True)
    return rows


def trial_row(repeats: int) -> dict:
    config = load_study_config(QUICKSTART)
    config.model.checkpoint = str(checkpoint("resnet20"))
    config.data.root = str(SHARED / "data" / "cifar10")
    with tempfile.TemporaryDirectory() as cache, patch.dict(os.environ, {CACHE_ENV: cache}):
        prepared = prepare(config)  # measured sensitivity computed, not read from a cache; the variable restored
    objective = prepared.objective
    names = prepared.space.parameter_names
    plans = [objective.plan_and_cost([params[name] for name in names])[0] for params, _ in prepared.seeds]
    scorer = objective.scorers[-1]
    applies, scores = [], []
    for index in range(repeats + 1):
        started = time.perf_counter()
        model = objective.apply(plans[index % len(plans)])
        applied = time.perf_counter()
        scorer(model)
        if index:  # the first is a warm-up
            applies.append(applied - started)
            scores.append(time.perf_counter() - applied)
    row = {"part": "trial", "model": config.model.name, "eval_images": config.search.eval_images,
           "apply_s": statistics.median(applies), "score_s": statistics.median(scores),
           "measured_sensitivity_images": config.search.measured_sensitivity_images,
           "measured_sensitivity_s": prepared.seconds["measured sensitivity"]}
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("layout", "trial", "all"), default="all")
    parser.add_argument("--images", type=int, default=1000, help="search-split images per layout timing")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a search worker's is 1 on 2 cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows, lines = [], []
    if args.part in ("layout", "all"):
        rows = layout_rows(args.images, args.repeats)
        lines = ["| model | batch size | NCHW images/s | channels_last images/s | speed-up |", "|---|---|---|---|---|"]
        for name in ("resnet20", "resnet56"):
            for batch_size in BATCH_SIZES:
                speed = {r["layout"]: r["images_per_second"] for r in rows
                         if r["model"] == name and r["batch_size"] == batch_size}
                lines.append(f"| {name} | {batch_size} | {speed['NCHW']:.0f} | {speed['channels_last']:.0f} | "
                             f"{speed['channels_last'] / speed['NCHW']:.2f}x |")
        lines += ["", f"Uniform OAQ W3A4, post-training quantized; {args.images} search-split images, median of "
                  f"{args.repeats}; {torch.get_num_threads()} torch thread(s).", ""]
    if args.part in ("trial", "all"):
        trial = trial_row(args.repeats)
        rows.append(trial)
        lines += [f"One quickstart search trial ({trial['model']}): apply the plan (quantize, calibrate, correct "
                  f"BatchNorm) {trial['apply_s']:.2f} s, score it on {trial['eval_images']} images "
                  f"{trial['score_s']:.2f} s (median of {args.repeats}). Before the search, measuring each tie "
                  f"group's sensitivity on {trial['measured_sensitivity_images']} images took "
                  f"{trial['measured_sensitivity_s']:.0f} s."]
    write_results(f"inference_speed{'' if args.part == 'all' else '_' + args.part}", rows, "\n".join(lines))


if __name__ == "__main__":
    main()
