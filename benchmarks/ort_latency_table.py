"""Does the measured ONNX Runtime table predict deployed latency? Its prediction against whole plans' time.

Per model and batch size: `hw measure --runtime onnxruntime` (hwmodels.measure_onnxruntime) builds the
table; then plans that differ in which layers get integer kernels (all float inputs, all 8-bit, W4A4,
the first / last k layers 8-bit, every other or third layer, random halves) are post-training quantized on
search-split images, exported as `oaq-search deploy` exports them, and timed end to end in ONNX
Runtime, all plans in alternation round by round (a noisy machine slows them alike; each plan runs
three times in a row per round and the last is timed, as a deployed model runs warm). Reported: each
plan's predicted and measured milliseconds, and over the plans other than the all-float, all-8-bit and
every-other-layer ones (the whole models the table is tied to) their Spearman rank correlation and the
mean absolute error relative to the measured time.

    python benchmarks/ort_latency_table.py --models resnet20 resnet56 --batches 1 64
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
from pathlib import Path

import tomli_w
import torch
from _common import SHARED, write_results
from deploy_onnx import _model
from scipy.stats import spearmanr

import hwmodels
from hwmodels.measure_onnxruntime import measure_onnxruntime
from oaq_search.data import load_cifar10
from oaq_search.deploy import export_onnx
from oaq_search.graph import build_layer_graph
from oaq_search.planning import PlanFactory
from oaq_search.ptq import CALIBRATION_IMAGES, post_training_quantize
from oaq_search.runtime import LATENCY_ROUNDS, paired_latency

RUNS_PER_TURN = 3  # runs of a plan in a row per round, the last timed (see runtime.paired_latency)
# the table is tied to these three (measure_onnxruntime times them): not in the scores
CALIBRATION = ("all float inputs", "all 8-bit inputs (W8A8)", "every other layer 8-bit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=LATENCY_ROUNDS)
    parser.add_argument("--tag", help="results file name after ort_latency_table_ (default: the models)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    splits = load_cifar10(SHARED / "data" / "cifar10", 5000)
    calibration = next(splits.search.batches(CALIBRATION_IMAGES))[0]
    rows, summary = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            model = _model(name)
            graph = build_layer_graph(model, splits.input_shape)
            paths = _deployed_plans(name, model, graph, splits, calibration, Path(scratch))
            for batch in args.batches:
                table = Path(scratch) / f"{name}-{batch}.toml"
                table.write_text(tomli_w.dumps(measure_onnxruntime(model, graph, splits.input_shape, batch,
                                                                   args.threads, args.rounds)))
                cost_model = hwmodels.get_cost_model(f"target:{table}")
                measured = paired_latency({label: path for label, (path, _) in paths.items()},
                                          next(splits.test.batches(batch))[0], args.threads, args.rounds,
                                          RUNS_PER_TURN)
                batch_rows = [{"model": name, "batch": batch, "plan": label, "integer_layers": integer,
                               "predicted_ms": cost_model.evaluate(graph, plan).totals["latency_s"] * 1e3,
                               "measured_ms": measured[label] * 1e3}
                              for label, (_, (plan, integer)) in paths.items()]
                rows += batch_rows
                summary.append(_agreement(name, batch, batch_rows))
                print(summary[-1], flush=True)
    _write(rows, summary, args)


def _deployed_plans(name: str, model, graph, splits, calibration, folder: Path) -> dict:
    """label -> (ONNX path, (plan, number of layers with 8-bit inputs)) for the plans timed."""
    factory = PlanFactory(name, model, graph, calibration=calibration)
    names = graph.names
    rng = random.Random(0)
    integer_sets = {"all float inputs": set(), "all 8-bit inputs (W8A8)": set(names),
                    **{f"first {k} layers 8-bit": set(names[:k]) for k in (len(names) // 4, len(names) // 2)},
                    **{f"last {k} layers 8-bit": set(names[-k:]) for k in (len(names) // 4, len(names) // 2)},
                    "every other layer 8-bit": set(names[::2]), "every third layer 8-bit": set(names[::3]),
                    **{f"random half 8-bit (seed {s})": set(rng.sample(names, len(names) // 2)) for s in (0, 1, 2)}}
    plans = {label: factory({n: 8 for n in names}, {n: 8 for n in integer}) for label, integer in integer_sets.items()}
    plans["W4A4"] = factory.uniform(4, 4, None)
    integer_sets["W4A4"] = set(names)
    paths = {}
    for index, (label, plan) in enumerate(plans.items()):
        path = folder / f"{name}-{index}.onnx"
        export_onnx(post_training_quantize(model, plan, splits.search), plan, calibration, path)
        paths[label] = (path, (plan, len(integer_sets[label])))
    return paths


def _agreement(name: str, batch: int, rows: list[dict]) -> dict:
    """How well the table ranks and predicts the plans it was not tied to."""
    held_out = [r for r in rows if r["plan"] not in CALIBRATION]
    predicted, measured = [r["predicted_ms"] for r in held_out], [r["measured_ms"] for r in held_out]
    errors = [abs(p - m) / m for p, m in zip(predicted, measured)]
    return {"model": name, "batch": batch, "plans": len(held_out), "spearman": float(spearmanr(predicted, measured)[0]),
            "mean_abs_error": statistics.mean(errors), "max_abs_error": max(errors)}


def _write(rows: list[dict], summary: list[dict], args) -> None:
    table = ["| model | batch | plans held out | Spearman | mean abs. error | max abs. error |",
             "|---|---:|---:|---:|---:|---:|"]
    table += [f"| {s['model']} | {s['batch']} | {s['plans']} | {s['spearman']:.3f} | {100 * s['mean_abs_error']:.1f} % "
              f"| {100 * s['max_abs_error']:.1f} % |" for s in summary]
    table += ["", "| model | batch | plan | layers with 8-bit inputs | predicted ms | measured ms | error |",
              "|---|---:|---|---:|---:|---:|---:|"]
    table += [f"| {r['model']} | {r['batch']} | {r['plan']} | {r['integer_layers']} | {r['predicted_ms']:.3f} | "
              f"{r['measured_ms']:.3f} | {100 * (r['predicted_ms'] / r['measured_ms'] - 1):+.1f} % |" for r in rows]
    table.append(f"\nThe table is tied to whole models shaped like the {', '.join(CALIBRATION)} plans (its "
                 f"`other_ops_s`, 8-bit scale and `switch_s_per_value`), so those are not scored. ONNX Runtime CPU provider, "
                 f"{args.threads} threads, median of {args.rounds} alternating rounds (the last of {RUNS_PER_TURN} "
                 "runs in a row); the table from `hw measure --runtime onnxruntime` at the same batch size, measured "
                 "in the same run.")
    text = "\n".join(table)
    print(text)
    name = "ort_latency_table_" + (args.tag or "_".join(args.models))
    print(f"written to {write_results(name, rows, text, {'summary': summary})}")


if __name__ == "__main__":
    main()
