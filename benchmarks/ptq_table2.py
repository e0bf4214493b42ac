"""The paper's Table 2 protocol: post-training OAQ vs vanilla, W8/W4/W3 weights, 8-bit activations.

Accuracy on the test split, reported as change against each checkpoint's own full-precision
accuracy on the same (JPEG-rebuilt) data. Two settings per cell: data-free (fixed s and T from
the weight-MSE rule, as the paper's "w/o FT"), and with 500 search-split calibration images, which
choose s and T by each layer's output error and correct BatchNorm statistics. First and last
layers stay at 8 bits (counted in the size).

    python benchmarks/ptq_table2.py --models resnet20                  # the paper's three grids
    python benchmarks/ptq_table2.py --models resnet56 --grids uniform
    python benchmarks/ptq_table2.py --models resnet20 --grids uniform midrise --bits 4 3 2
    python benchmarks/ptq_table2.py --models --densenet-checkpoint PATH  # DenseNet-BC-100, given a checkpoint
"""

from __future__ import annotations

import argparse
import time

from _common import SHARED, checkpoint, write_results

from hwmodels import MemoryModel
from oaq_search.data import load_cifar10
from oaq_search.evaluate import accuracy
from oaq_search.grids import GRIDS
from oaq_search.pipeline import layer_graph, load_model
from oaq_search.planning import PlanFactory
from oaq_search.ptq import CALIBRATION_IMAGES, post_training_quantize

# Paper Table 2 (absolute top-1 %). Its FP accuracy is stated only for ResNet-20 (92.60, Table 3).
PAPER = {
    ("resnet20", "vanilla"): {8: 92.9, 4: 88.0, 3: 36.5}, ("resnet20", "oaq"): {8: 93.1, 4: 90.5, 3: 85.4},
    ("resnet56", "vanilla"): {8: 94.1, 4: 90.6, 3: 23.7}, ("resnet56", "oaq"): {8: 94.4, 4: 92.5, 3: 82.3},
    ("densenet100", "vanilla"): {8: 94.6, 4: 92.3, 3: 55.3}, ("densenet100", "oaq"): {8: 94.7, 4: 93.2, 3: 86.7},
}
PAPER_FP = {"resnet20": 92.60}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["resnet20", "resnet56"])
    parser.add_argument("--densenet-checkpoint", help="add DenseNet-BC-100 from this checkpoint")
    parser.add_argument("--grids", nargs="+", choices=GRIDS, default=["uniform", "pot", "ipot"])
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3], help="weight bit-widths")
    parser.add_argument("--data-root", default=str(SHARED / "data/cifar10"))
    args = parser.parse_args()
    checkpoints = {name: checkpoint(name) for name in args.models}
    if args.densenet_checkpoint:
        checkpoints["densenet100"] = args.densenet_checkpoint
    splits = load_cifar10(args.data_root)
    rows = []
    for name, path in checkpoints.items():
        model = load_model(name, path)
        graph = layer_graph(name, model)
        calibration = next(splits.search.batches(CALIBRATION_IMAGES))[0]
        fp = accuracy(model, splits.test)
        print(f"{name}: full precision {fp:.2f} %", flush=True)
        for grid in args.grids:
            for method in ("vanilla", "oaq"):
                factories = {False: PlanFactory(name, model, graph, method, grid),  # data-free: weight MSE
                             True: PlanFactory(name, model, graph, method, grid, calibration=calibration)}
                for weight_bits in args.bits:
                    for bn_correction in ((False, True) if grid == "uniform" else (True,)):
                        plan = factories[bn_correction].uniform(weight_bits, activation_bits=8)
                        started = time.perf_counter()
                        quantized = post_training_quantize(model, plan, splits.search, bn_correction)
                        quantize_s = time.perf_counter() - started
                        top1 = accuracy(quantized, splits.test)
                        paper = PAPER.get((name, method), {}).get(weight_bits)
                        row = {"model": name, "grid": grid, "method": method, "weight_bits": weight_bits,
                               "activation_bits": 8, "bn_correction": bn_correction,
                               "outlier_rule": "output_error" if bn_correction else "weight_mse", "fp_accuracy": fp,
                               "accuracy": top1, "change": top1 - fp, "quantize_s": round(quantize_s, 2),
                               "weight_kib": MemoryModel().evaluate(graph, plan).totals["weight_bytes"] / 1024,
                               "paper_accuracy": paper,
                               "paper_change": None if paper is None or name not in PAPER_FP else paper - PAPER_FP[name]}
                        rows.append(row)
                        print(f"  {grid:7} {method:7} W{weight_bits}A8 bn_correction={bn_correction!s:5} "
                              f"{top1:.2f} % ({top1 - fp:+.2f}) in {quantize_s:.1f} s", flush=True)
        # after every model, so a stopped run keeps its results
        write_results(results_name(parser, args, checkpoints), rows, markdown(rows))


def results_name(parser: argparse.ArgumentParser, args: argparse.Namespace, checkpoints: dict) -> str:
    """ptq_table2_<models>, then the grids and bits where they are not the defaults."""
    name = f"ptq_table2_{'_'.join(checkpoints)}"
    if (args.grids, args.bits) != (parser.get_default("grids"), parser.get_default("bits")):
        name += f"_{'_'.join(args.grids)}_w{''.join(map(str, args.bits))}"
    return name


def markdown(rows: list[dict]) -> str:
    lines = ["| model | grid | method | W/A | calibration data | FP % | quantized % | change | paper % | paper change | KiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = "" if r["paper_accuracy"] is None or r["grid"] != "uniform" else f"{r['paper_accuracy']:.1f}"
        paper_change = "" if r["paper_change"] is None or r["grid"] != "uniform" else f"{r['paper_change']:+.1f}"
        lines.append(f"| {r['model']} | {r['grid']} | {r['method']} | W{r['weight_bits']}A8 | "
                     f"{'yes' if r['bn_correction'] else 'no'} | {r['fp_accuracy']:.2f} | {r['accuracy']:.2f} | "
                     f"{r['change']:+.2f} | {paper} | {paper_change} | {r['weight_kib']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
