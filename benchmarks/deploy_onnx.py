"""Deployed in ONNX Runtime: accuracy beside PyTorch's for the same plan, integer kernels, size, latency.

For each model and plan: post-training quantization (500 search-split calibration images, BatchNorm
corrected), PyTorch's test accuracy, the QDQ ONNX export, ONNX Runtime's accuracy on the same test
images and how often both give the same class, the share of convolutions and linears ONNX Runtime
runs as integer kernels, the file size, and latency against the float ONNX model at batch 1 and 64
(--threads; a plan's export variants and the float model timed in one alternation). Plans: uniform
OAQ at the --uniform settings (WxAy) and, for models in --search-models, the search at average
weight bits --search-bits with 8-bit activations.
--weights: int8 containers (integer kernels) and/or packed (int2/int4/int8 codes, run dequantized);
--quantize-skips adds int8 rows whose residual adds take the 8-bit quantized block input (integer adds).

    python benchmarks/deploy_onnx.py --models resnet20 tiny_mobilenet --search-models resnet20
    python benchmarks/deploy_onnx.py --models resnet56 --uniform W8A8 W4A8
    python benchmarks/deploy_onnx.py --models resnet20 --uniform W8A8 W4A8 W2A8 --search-models none --weights packed
    python benchmarks/deploy_onnx.py --models resnet20 resnet56 --uniform W8A8 W4A8 --search-models none --quantize-skips
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import REPOSITORY, SHARED, checkpoint, write_results
from search_quality import budget_bytes

import oaq_search as oaq
from oaq_search.checkpoints import load_checkpoint
from oaq_search.data import load_cifar10
from oaq_search.deploy import WEIGHT_FORMATS, export_float_onnx, export_onnx
from oaq_search.evaluate import logits, top1
from oaq_search.graph import build_layer_graph
from oaq_search.pipeline import load_model
from oaq_search.planning import PlanFactory
from oaq_search.ptq import CALIBRATION_IMAGES, post_training_quantize
from oaq_search.runtime import LATENCY_ROUNDS, accuracy_change, agreement, kernel_counts, onnx_logits, paired_latency

EXAMPLE = REPOSITORY / "examples" / "own_model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet56", "tiny_mobilenet"])
    parser.add_argument("--uniform", nargs="+", default=["W8A8", "W4A8", "W4A4", "W3A8"])
    parser.add_argument("--search-models", nargs="+", default=["resnet20"])
    parser.add_argument("--search-bits", type=float, nargs="+", default=[3.0, 2.5])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=LATENCY_ROUNDS)
    parser.add_argument("--weights", nargs="+", choices=WEIGHT_FORMATS, default=["int8"])
    parser.add_argument("--quantize-skips", action="store_true")
    parser.add_argument("--tag", help="appended to the results file name (another machine, say)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    splits = load_cifar10(SHARED / "data" / "cifar10", 5000)
    test = splits.test.subset(args.test_images)
    calibration = next(splits.search.batches(CALIBRATION_IMAGES))[0]
    rows = []
    for name in args.models:
        model = _model(name)
        graph = build_layer_graph(model, splits.input_shape)
        factory = PlanFactory(name, model, graph, calibration=calibration)
        plans = {setting: factory.uniform(int(setting[1:setting.index("A")]), int(setting[setting.index("A") + 1:]))
                 for setting in args.uniform}
        if name in args.search_models:
            plans.update(_search_plans(name, model, splits, args))
        fp = top1(logits(model, test), test)
        variants = [(weights, False) for weights in args.weights] + [("int8", True)] * args.quantize_skips
        for label, plan in plans.items():
            for row in _deploy(model, plan, splits, test, calibration, variants, args):
                rows.append({"model": name, "plan": label, "fp_test": fp, **row})
                print(rows[-1], flush=True)
    _write(rows, args)


def _model(name: str) -> torch.nn.Module:
    """A registry model with its checkpoint, or the example's own model (a factory) with its checkpoint."""
    if name != "tiny_mobilenet":
        return load_model(name, checkpoint(name))
    sys.path.insert(0, str(EXAMPLE))
    from model import build  # examples/own_model/model.py

    return load_checkpoint(build(), checkpoint(name)).eval()


def _search_plans(name: str, model, splits, args) -> dict:
    """The search's plans at each average weight-bit budget, every layer's input at 8 bits."""
    loader = list(splits.search.batches(500))
    plans = {}
    for bits in args.search_bits:
        budget = f"{budget_bytes(name, bits) / 1024:.1f}KiB"
        result = oaq.search(model, loader, budget={"memory": budget}, n_trials=args.trials, seed=0,
                            activation_bits=8, name=f"{name}-{bits}", progress=False)
        plans[f"search {bits:g} bits ({budget}) A8"] = result.plan
    return plans


def _deploy(model, plan, splits, test, calibration, variants: list[tuple[str, bool]], args) -> list[dict]:
    """One row per export variant (weights, quantized skips) of `plan`; every variant and the float model
    timed in one alternation, so their speedups compare within the row group."""
    quantized = post_training_quantize(model, plan, splits.search)
    torch_logits = logits(quantized, test)
    rows, paths = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        baseline = Path(scratch) / "float.onnx"
        export_float_onnx(model, calibration, baseline)
        for weights, skips in variants:
            label, path = weights + ", quantized skips" * skips, Path(scratch) / f"{len(paths)}.onnx"
            started = time.perf_counter()
            export_onnx(quantized, plan, calibration, path, weights=weights, quantize_skips=skips)
            export_seconds = time.perf_counter() - started
            ort_logits, kernels = onnx_logits(path, test, threads=args.threads), kernel_counts(path)
            change, error = accuracy_change(ort_logits, torch_logits, test.labels)
            rows[label] = {"weights": label, "torch_test": top1(torch_logits, test), "ort_test": top1(ort_logits, test),
                           "ort_minus_torch": change, "ort_minus_torch_error": error,
                           "same_class": agreement(ort_logits, torch_logits), "integer_kernels": kernels["integer"],
                           "float_kernels": kernels["float"], "onnx_kib": path.stat().st_size / 1024,
                           "float_onnx_kib": baseline.stat().st_size / 1024, "export_s": export_seconds}
            paths[label] = path
        for batch in (1, 64):
            seconds = paired_latency({**paths, "float": baseline}, next(test.batches(batch))[0], args.threads,
                                     args.rounds)
            for label, row in rows.items():
                row.update({f"batch{batch}_ms": seconds[label] * 1e3, f"batch{batch}_float_ms": seconds["float"] * 1e3,
                            f"batch{batch}_speedup": seconds["float"] / seconds[label]})
    return list(rows.values())


def _error(row: dict) -> str:
    """' ± s.e.' of ORT minus PyTorch, where the row has it (results files from before it do not)."""
    return f" ± {row['ort_minus_torch_error']:.2f}" if "ort_minus_torch_error" in row else ""


def _write(rows: list[dict], args) -> None:
    table = ["| model | plan | weights | PyTorch test (change vs FP) | ONNX Runtime test | ORT - PyTorch (± 1 s.e.) | same class | "
             "integer kernels | ONNX KiB (float) | batch 1 ms (float, speedup) | batch 64 ms (float, speedup) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['model']} | {r['plan']} | {r.get('weights', 'int8')} | {r['torch_test']:.2f} ({r['torch_test'] - r['fp_test']:+.2f}) | "
                     f"{r['ort_test']:.2f} | {r['ort_minus_torch']:+.2f}{_error(r)} | {100 * r['same_class']:.1f} % | "
                     f"{r['integer_kernels']} of {r['integer_kernels'] + r['float_kernels']} | "
                     f"{r['onnx_kib']:.0f} ({r['float_onnx_kib']:.0f}) | {r['batch1_ms']:.2f} ({r['batch1_float_ms']:.2f}, "
                     f"{r['batch1_speedup']:.2f}x) | {r['batch64_ms']:.1f} ({r['batch64_float_ms']:.1f}, "
                     f"{r['batch64_speedup']:.2f}x) |")
    table.append(f"\nONNX Runtime {_ort_version()}, CPU provider, {args.threads} threads, median of {args.rounds} "
                 f"alternating runs per batch size (a plan's variants and the float model in one alternation); "
                 f"{args.test_images} test images.")
    text = "\n".join(table)
    print(text)
    name = "_".join(["deploy_onnx", *args.models, *([] if args.weights == ["int8"] else args.weights),
                     *(["skips"] if args.quantize_skips else []), *([args.tag] if args.tag else [])])
    print(f"written to {write_results(name, rows, text)}")


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    main()
