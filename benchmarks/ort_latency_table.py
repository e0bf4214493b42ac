"""Does the measured ONNX Runtime table predict deployed latency? Its prediction against whole plans' time.

Per model and batch size: `hw measure --runtime onnxruntime` (hwmodels.measure_onnxruntime) builds the
table; then plans that differ in which layers get integer kernels (all float inputs, all 8-bit, W4A4,
half 4-bit, the first / last k layers 8-bit, every other or third layer, random halves) are post-training quantized on
search-split images, exported as `oaq-search deploy` exports them, and timed end to end in ONNX
Runtime, all plans in alternation round by round (a noisy machine slows them alike; each plan runs
three times in a row per round and the last is timed, as a deployed model runs warm). Reported: each
plan's predicted and measured milliseconds, and over the plans other than the all-float, all-8-bit and
every-other-layer ones (shaped like the whole models the table is tied to) their Spearman rank
correlation and the mean absolute error relative to the measured time; both for the table as measured
and for the same layer times tied to the anchor models timed again beside the plans (the machine's
drift between the two runs taken out).

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
from hwmodels.measure_onnxruntime import OrtTimings, anchor_models, ort_table, time_onnxruntime
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
            anchors = anchor_models(model, graph, splits.input_shape, max(args.batches), Path(scratch))
            for batch in args.batches:
                timings = time_onnxruntime(model, graph, splits.input_shape, batch, args.threads, args.rounds)
                # every plan in two sessions: their difference is the noise floor any prediction meets
                measured = paired_latency({**{f"{label} #{copy}": path for label, (path, _) in paths.items() for copy in (0, 1)},
                                           **anchors}, next(splits.test.batches(batch))[0], args.threads,
                                          args.rounds, RUNS_PER_TURN)
                twice = {label: (measured[f"{label} #0"], measured[f"{label} #1"]) for label in paths}
                # the same layer times tied to the anchors timed beside the plans: the machine's drift taken out
                retied = OrtTimings(timings.layers, {label: measured[label] for label in anchors})
                predicted = {table: _predictions(ort_table(graph, tied, batch, args.threads), graph, paths,
                                                 Path(scratch) / f"{name}-{batch}-{table}.toml")
                             for table, tied in (("as measured", timings), ("anchors re-timed", retied))}
                drift = {label: measured[label] / timings.whole[label] - 1 for label in anchors}
                print(f"{name} batch {batch}: anchors timed beside the plans vs in the table's run: "
                      + ", ".join(f"{label} {100 * change:+.1f} %" for label, change in drift.items()), flush=True)
                batch_rows = [{"model": name, "batch": batch, "plan": label, "integer_layers": integer,
                               **{f"predicted_ms {table}": values[label] for table, values in predicted.items()},
                               "measured_ms": 1e3 * sum(twice[label]) / 2,
                               "first_session_ms": 1e3 * twice[label][0], "second_session_ms": 1e3 * twice[label][1]}
                              for label, (_, (_, integer)) in paths.items()]
                rows += batch_rows
                summary += [{**_agreement(name, batch, batch_rows, f"predicted_ms {table}"), "table": table,
                             "anchor_drift": drift} for table in predicted]
                summary.append({**_agreement(name, batch, batch_rows, "second_session_ms", "first_session_ms"),
                                "table": "second session predicting the first (noise floor)", "anchor_drift": drift})
                print(summary[-3:], flush=True)
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
    half = set(rng.sample(names, len(names) // 2))
    plans["random half 4-bit, rest 8-bit inputs"] = factory({n: 8 for n in names}, {n: 4 if n in half else 8 for n in names})
    integer_sets["W4A4"] = integer_sets["random half 4-bit, rest 8-bit inputs"] = set(names)
    paths = {}
    for index, (label, plan) in enumerate(plans.items()):
        path = folder / f"{name}-{index}.onnx"
        export_onnx(post_training_quantize(model, plan, splits.search), plan, calibration, path)
        paths[label] = (path, (plan, len(integer_sets[label])))
    return paths


def _predictions(table: dict, graph, paths: dict, path: Path) -> dict[str, float]:
    """Milliseconds `table` (written to `path`, read as a `target:` cost model) predicts for each plan."""
    path.write_text(tomli_w.dumps(table))
    cost_model = hwmodels.get_cost_model(f"target:{path}")
    return {label: cost_model.evaluate(graph, plan).totals["latency_s"] * 1e3 for label, (_, (plan, _)) in paths.items()}


def _agreement(name: str, batch: int, rows: list[dict], column: str, truth: str = "measured_ms") -> dict:
    """How well `column` ranks and predicts `truth` for the plans the table was not tied to."""
    held_out = [r for r in rows if r["plan"] not in CALIBRATION]
    predicted, measured = [r[column] for r in held_out], [r[truth] for r in held_out]
    errors = [abs(p - m) / m for p, m in zip(predicted, measured)]
    return {"model": name, "batch": batch, "plans": len(held_out), "spearman": float(spearmanr(predicted, measured)[0]),
            "mean_abs_error": statistics.mean(errors), "max_abs_error": max(errors)}


def _write(rows: list[dict], summary: list[dict], args) -> None:
    table = ["| model | batch | table | plans held out | Spearman | mean abs. error | max abs. error |",
             "|---|---:|---|---:|---:|---:|---:|"]
    table += [f"| {s['model']} | {s['batch']} | {s['table']} | {s['plans']} | {s['spearman']:.3f} | "
              f"{100 * s['mean_abs_error']:.1f} % | {100 * s['max_abs_error']:.1f} % |" for s in summary]
    table += ["", "| model | batch | anchor | timed beside the plans vs in the table's run |", "|---|---:|---|---:|"]
    table += [f"| {s['model']} | {s['batch']} | {label} | {100 * change:+.1f} % |"
              for s in summary if s["table"] == "as measured" for label, change in s["anchor_drift"].items()]
    table += ["", "| model | batch | plan | layers with 8-bit inputs | predicted ms (as measured) | predicted ms "
              "(anchors re-timed) | measured ms (sessions 1 / 2) | error (as measured) | error (anchors re-timed) |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    table += [f"| {r['model']} | {r['batch']} | {r['plan']} | {r['integer_layers']} | "
              f"{r['predicted_ms as measured']:.3f} | {r['predicted_ms anchors re-timed']:.3f} | {r['measured_ms']:.3f} ({r['first_session_ms']:.3f} / {r['second_session_ms']:.3f}) | "
              f"{100 * (r['predicted_ms as measured'] / r['measured_ms'] - 1):+.1f} % | "
              f"{100 * (r['predicted_ms anchors re-timed'] / r['measured_ms'] - 1):+.1f} % |" for r in rows]
    table.append(f"\nThe table is tied to four whole models (all float inputs, all 8-bit, every other layer 8-bit, all "
                 f"4-bit: its `other_ops_s`, 8-bit scale, `switch_s_per_value` and Clip price), so the {', '.join(CALIBRATION)} "
                 "plans are not scored. *As measured*: the table `hw measure --runtime onnxruntime` writes, every layer "
                 "shape and the four models timed in one alternation. *Anchors re-timed*: the same layer times tied to "
                 "the four models timed again beside the plans, which takes out how much the machine's speed drifted "
                 "between the two runs (no table can know that). Each plan is timed in two sessions in the same "
                 "alternation; measured is their mean, and how well one session's time predicts the other's is the "
                 "noise floor of the scores. ONNX Runtime CPU provider, "
                 f"{args.threads} threads, median of {args.rounds} alternating rounds (the last of {RUNS_PER_TURN} "
                 "runs in a row).")
    text = "\n".join(table)
    print(text)
    name = "ort_latency_table_" + (args.tag or "_".join(args.models))
    print(f"written to {write_results(name, rows, text, {'summary': summary})}")


if __name__ == "__main__":
    main()
