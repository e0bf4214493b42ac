"""Post-training quantization rounded to nearest vs block reconstruction (AdaRound rounding, QDrop).

For each model and plan: post-training quantization (500 search-split calibration images, BatchNorm
corrected), then reconstruction on the search split's first `--images` images with the study
defaults (`[ptq]`), both scored on the whole test split as change against the checkpoint's own full
precision; optionally followed by fine-tuning (`--finetune-epochs`, `--finetune-mode`) of the reconstructed model.
Plans: `W3A8` (uniform OAQ), `vanilla:W3A8` (max-range, no outlier handling), `search:3.0` (the
search's plan at 3 average weight bits, 8-bit activations, as benchmarks/deploy_onnx.py makes it).

    python benchmarks/reconstruction.py --models resnet20 --plans W3A8 W2A8 W4A4 vanilla:W3A8 search:3.0 search:2.5
    python benchmarks/reconstruction.py --models resnet20 --plans W4A4 --finetune-epochs 1 3 --tag w4a4_finetune
    python benchmarks/reconstruction.py --plans search:2.4:A4 --search-cost-model memory-base3 --tag resnet20_2.4bits
    python benchmarks/reconstruction.py --models resnet56 --plans W3A8 W2A8
    python benchmarks/reconstruction.py --plans W4A4 --per-channel --finetune-epochs 1 3 --finetune-mode qat --tag resnet20_w4a4_per_channel
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch
from _common import SHARED, checkpoint, write_results
from search_quality import budget_bytes

import hwmodels
import oaq_search as oaq
from oaq_search.config import FinetuneConfig, PtqConfig
from oaq_search.data import load_cifar10
from oaq_search.evaluate import accuracy
from oaq_search.finetuning import finetune
from oaq_search.pipeline import layer_graph, load_model
from oaq_search.planning import PlanFactory
from oaq_search.ptq import CALIBRATION_IMAGES, post_training_quantize, reconstruct_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20"])
    parser.add_argument("--plans", nargs="+", default=["W3A8", "W2A8", "W4A4", "vanilla:W3A8", "search:3.0",
                                                       "search:2.5"])
    parser.add_argument("--iterations", type=int, default=PtqConfig.iterations, help="steps per block")
    parser.add_argument("--images", type=int, default=PtqConfig.images)
    parser.add_argument("--restarts", type=int, default=PtqConfig.restarts, help="reconstructions with seeds --seed on, "
                        "the best on the search images past --images kept")
    parser.add_argument("--finetune-epochs", type=int, nargs="*", default=[], help="fine-tune after reconstruction")
    parser.add_argument("--finetune-mode", choices=("scale", "qat"), default="scale")
    parser.add_argument("--finetune-learning-rate", type=float, help="default: the mode's (FinetuneConfig)")
    parser.add_argument("--per-channel", action="store_true", help="uniform plans' weights scaled per output channel")
    parser.add_argument("--search-trials", type=int, default=32)
    parser.add_argument("--search-cost-model", default="memory", help="memory-base3: ternary layers packed five a byte")
    parser.add_argument("--data-root", default=str(SHARED / "data/cifar10"))
    parser.add_argument("--seed", type=int, default=0, help="of the reconstruction's and the fine-tune's random draws")
    parser.add_argument("--tag", help="results file suffix (default: the models)")
    args = parser.parse_args()
    splits = load_cifar10(args.data_root)
    config = PtqConfig(reconstruct=True, iterations=args.iterations, images=args.images, seed=args.seed,
                       restarts=args.restarts)
    calibration = next(splits.search.batches(CALIBRATION_IMAGES))[0]
    rows, cost_model = [], hwmodels.get_cost_model(args.search_cost_model)  # sizes as the search counts them
    for name in args.models:
        model = load_model(name, checkpoint(name))
        graph = layer_graph(name, model)
        fp = accuracy(model, splits.test, progress=False)
        print(f"{name}: full precision {fp:.2f} %", flush=True)
        for label in args.plans:
            plan = _plan(label, name, model, graph, splits, calibration, args)
            nearest = post_training_quantize(model, plan, splits.search)
            row = {"model": name, "plan": label + " per channel" * plan.layers[0].per_channel,
                   "weight_kib": round(cost_model.evaluate(graph, plan).totals["weight_bytes"] / 1024, 1), "fp": fp,
                   "nearest": accuracy(nearest, splits.test, progress=False) - fp}
            reconstructed, row["seconds"], tuned = reconstructed_copy(nearest, model, plan, splits, config)
            row["held_out_accuracies"] = tuned.metadata["reconstruction"].get("held_out_accuracies")
            row["reconstructed"] = accuracy(reconstructed, splits.test, progress=False) - fp
            for epochs in args.finetune_epochs:
                tuning = FinetuneConfig(mode=args.finetune_mode, epochs=epochs, seed=args.seed,
                                        learning_rate=args.finetune_learning_rate)
                row[f"finetune_{epochs}"], row[f"finetune_{epochs}_seconds"] = _finetuned(
                    model, plan, splits, reconstructed, tuning, fp)
            print(_line(row, args), flush=True)
            rows.append(row)
    _write(rows, args, config)


def _plan(label: str, name: str, model, graph, splits, calibration, args):
    """A plan from its label: [vanilla:]W<bits>A<bits>, or search:<average weight bits>[:A<bits>] (default A8)."""
    if label.startswith("search:"):
        _, bits, *activation = label.split(":")
        return searched(name, model, splits, float(bits), int(activation[0][1:]) if activation else 8,
                        args.search_trials, args.search_cost_model).plan
    method, _, setting = label.rpartition(":")
    weight_bits, activation_bits = setting[1:].split("A")
    return PlanFactory(name, model, graph, method or "oaq", "uniform", args.per_channel, calibration).uniform(
        int(weight_bits), int(activation_bits))


def reconstructed_copy(nearest, model, plan, splits, config: PtqConfig):
    """`nearest` (the plan rounded to nearest) reconstructed on the search split, as a copy, the seconds it took,
    and the plan it follows."""
    started = time.perf_counter()
    reconstructed = copy.deepcopy(nearest)
    tuned = reconstruct_plan(reconstructed, model, plan, splits.search, config, progress=False)
    return reconstructed, time.perf_counter() - started, tuned


def searched(name: str, model, splits, bits: float, activation_bits: int, trials: int, cost_model: str, **options):
    """The search at `bits` average weight bits (the budget `budget_bytes` gives), as deploy_onnx.py runs it."""
    budget = f"{budget_bytes(name, bits) / 1024:.1f}KiB"
    return oaq.search(model, list(splits.search.batches(500)), budget={"memory": budget}, n_trials=trials, seed=0,
                      activation_bits=activation_bits, name=f"{name}-search:{bits:g}", cost_model=cost_model,
                      progress=False, **options)


def _finetuned(model, plan, splits, reconstructed, config: FinetuneConfig, fp: float) -> tuple[float, float]:
    """Test change after fine-tuning started from the reconstructed model, and its seconds."""
    with tempfile.TemporaryDirectory() as folder:
        result = finetune(model, plan, splits, config, folder, progress=False, quantized=reconstructed)
    return accuracy(result.model, splits.test, progress=False) - fp, result.seconds


def _line(row: dict, args) -> str:
    tuned = "".join(f", +{e} epoch{'s' * (e > 1)} {args.finetune_mode} {row[f'finetune_{e}']:+.2f}"
                    for e in args.finetune_epochs)
    return (f"  {row['plan']:14} {row['weight_kib']:6.1f} KiB: nearest {row['nearest']:+.2f}, reconstructed "
            f"{row['reconstructed']:+.2f} ({row['seconds']:.0f} s){tuned}")


def _write(rows: list[dict], args, config: PtqConfig) -> None:
    tuned = "".join(f" | + {e} epoch{'s' * (e > 1)} {args.finetune_mode} fine-tune" for e in args.finetune_epochs)
    lines = [f"Test split (10,000 images), change vs each checkpoint's full precision; reconstruction with "
             f"{config.iterations} steps per block on {config.images} search-split images, {torch.get_num_threads()} "
             f"threads" + (f", seed {config.seed}" if config.seed else "")
             + (f", {config.restarts} restarts (seeds {config.seed}-{config.seed + config.restarts - 1}, the best on the "
                f"search-split images past those it fits on kept)" if config.restarts > 1 else "")
             + (f", fine-tune learning rate {args.finetune_learning_rate:g}" if args.finetune_learning_rate else "")
             + ".", "",
             f"| model | plan | weights (KiB) | rounded to nearest | reconstructed | reconstruction time{tuned} |",
             "|---|---|---:|---:|---:|---:|" + "---:|" * len(args.finetune_epochs)]
    for row in rows:
        cells = "".join(f" | {row[f'finetune_{e}']:+.2f} ({row[f'finetune_{e}_seconds']:.0f} s)"
                        for e in args.finetune_epochs)
        lines.append(f"| {row['model']} (FP {row['fp']:.2f}) | {row['plan']} | {row['weight_kib']} | "
                     f"{row['nearest']:+.2f} | {row['reconstructed']:+.2f} | {row['seconds']:.0f} s{cells} |")
    lines += [f"\n{row['model']} {row['plan']}: held-out search accuracy by seed "
              + ", ".join(f"{config.seed + i}: {score:.2f} %" for i, score in enumerate(row["held_out_accuracies"]))
              for row in rows if row["held_out_accuracies"]]
    path = write_results(f"reconstruction_{args.tag or '_'.join(args.models)}", rows, "\n".join(lines),
                         {"reconstruction": vars(config)})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
