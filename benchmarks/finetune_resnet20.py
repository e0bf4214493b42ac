"""The paper's Tables 3 and 4 on ResNet-20: scale fine-tuning, and weight-only QAT vanilla vs OAQ.

`--part scale`: W8A8, W4A8, W8A4 and W4A4, each post-training (w/o FT) and after scale fine-tuning
(W8A4 is not in the paper: with W4A8 it splits W4A4's loss between weights and activations).
`--part qat`: weights only at 4, 3 and 2 bits, vanilla vs OAQ quantization-aware training (with
`--activation-bits`, activations quantized too: not in the paper's table).
Accuracy on the test split as change against the checkpoint's own FP accuracy, beside the paper's
changes. Each row's fine-tune keeps its state under runs/benchmarks/, so a stopped run resumes.

    python benchmarks/finetune_resnet20.py --part scale --epochs 3
    python benchmarks/finetune_resnet20.py --part qat --epochs 4 --bits 2
    python benchmarks/finetune_resnet20.py --part qat --epochs 1 --bits 4 3
    python benchmarks/finetune_resnet20.py --part qat --epochs 2 --bits 4 --activation-bits 4 --methods oaq
    python benchmarks/finetune_resnet20.py --part scale --epochs 3 --settings W4A4 --train-split all
    python benchmarks/finetune_resnet20.py --part scale --epochs 3 --settings W4A8 W4A4 --per-channel
    python benchmarks/finetune_resnet20.py --part scale --settings W4A4 --finetune 'quantizer_learning_rate = 0.03'
"""

from __future__ import annotations

import argparse
import re
import tomllib

from _common import SHARED, checkpoint, write_results

from oaq_search.config import FinetuneConfig
from oaq_search.data import load_cifar10
from oaq_search.errors import UserError
from oaq_search.pipeline import finetune_and_test, layer_graph, load_model
from oaq_search.planning import PlanFactory
from oaq_search.ptq import CALIBRATION_IMAGES
from oaq_search.schema import parse

# Paper changes vs FP 92.60 (Table 3, OAQ: w/o FT -> w/ FT; Table 4, QAT weights only).
PAPER_SCALE = {(8, 8): (0.52, 0.50), (4, 8): (-2.09, 0.06), (4, 4): (-2.94, 0.01)}
SCALE_SETTINGS = {"W8A8": (8, 8), "W4A8": (4, 8), "W8A4": (8, 4), "W4A4": (4, 4)}  # W8A4: not in the paper
PAPER_QAT = {("vanilla", 4): 0.04, ("oaq", 4): 0.19, ("vanilla", 3): -1.69, ("oaq", 3): -0.48,
             ("vanilla", 2): -46.01, ("oaq", 2): -2.46}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("scale", "qat"), required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2], help="qat weight bits")
    parser.add_argument("--activation-bits", type=int, default=None, help="qat activation bits (default: none)")
    parser.add_argument("--methods", nargs="+", choices=("vanilla", "oaq"), default=["vanilla", "oaq"], help="qat methods")
    parser.add_argument("--settings", nargs="+", choices=SCALE_SETTINGS, default=list(SCALE_SETTINGS),
                        help="scale settings")
    parser.add_argument("--per-channel", action="store_true",
                        help="weights normalized and ranged per output channel (the paper: per layer)")
    parser.add_argument("--train-split", choices=("finetune", "all"), default="finetune",
                        help="all: train on the search split too (images the checkpoint never saw)")
    parser.add_argument("--finetune", action="append", default=[], metavar="'KEY = VALUE'",
                        help="a line of a study file's [finetune] section, e.g. 'device = \"cuda\"' (repeatable)")
    parser.add_argument("--data-root", default=str(SHARED / "data/cifar10"))
    args = parser.parse_args()
    try:
        args.overrides = tomllib.loads("\n".join(args.finetune))
    except tomllib.TOMLDecodeError as error:
        raise SystemExit(f"--finetune takes study-file lines such as 'epochs = 3' or 'device = \"cuda\"': {error}")
    model = load_model("resnet20", checkpoint("resnet20"))
    graph = layer_graph("resnet20", model)
    splits = load_cifar10(args.data_root)
    calibration = next(splits.search.batches(CALIBRATION_IMAGES))[0]
    try:
        config = parse(FinetuneConfig, {"mode": args.part, "epochs": args.epochs, "train_split": args.train_split,
                                        **args.overrides}, "--finetune")
    except UserError as error:
        raise SystemExit(f"error: {error}")
    if args.part == "scale":
        settings = [("oaq", *bits) for name, bits in SCALE_SETTINGS.items() if name in args.settings]
    else:
        settings = [(method, bits, args.activation_bits) for bits in args.bits for method in args.methods]
    rows = []
    for method, weight_bits, activation_bits in settings:
        plan = PlanFactory("resnet20", model, graph, method, per_channel=args.per_channel,
                           calibration=calibration).uniform(weight_bits, activation_bits)
        label = f"W{weight_bits}" + (f"A{activation_bits}" if activation_bits else "")
        folder = (f"runs/benchmarks/finetune_{args.part}/{method}_{label}_e{args.epochs}_{args.train_split}"
                  f"{'_per_channel' if args.per_channel else ''}{suffix(args)}")
        result = finetune_and_test(model, plan, splits, config, folder)
        scores = result.scores
        paper_before, paper_after = PAPER_SCALE.get((weight_bits, activation_bits), (None, None)) \
            if args.part == "scale" else (None, None if activation_bits else PAPER_QAT[(method, weight_bits)])
        rows.append({"setting": label, "method": method, "mode": config.mode, "epochs": args.epochs,
                     "train_split": config.train_split, "per_channel": args.per_channel, "overrides": args.overrides,
                     "distill": config.distill, "fp_accuracy": scores["fp_test_accuracy"],
                     "ptq_accuracy": scores["ptq_test_accuracy"], "finetuned_accuracy": scores["test_accuracy"],
                     "ptq_change": scores["ptq_test_accuracy"] - scores["fp_test_accuracy"],
                     "finetuned_change": scores["test_accuracy"] - scores["fp_test_accuracy"],
                     "paper_ptq_change": paper_before, "paper_finetuned_change": paper_after,
                     "finetune_s": round(result.seconds, 1),
                     "images_per_second": round(result.history[-1]["images_per_second"], 1),
                     "history": result.history})
        print(f"{method} {label}: post-training {rows[-1]['ptq_change']:+.2f}, fine-tuned "
              f"{rows[-1]['finetuned_change']:+.2f} ({result.seconds:.0f} s)", flush=True)
        write_results(results_name(args), rows, markdown(rows))  # after every row


def results_name(args: argparse.Namespace) -> str:
    """finetune_<part>_resnet20, then what differs from the part's defaults (qat: the bits)."""
    if args.part == "scale":
        parts = [] if args.settings == list(SCALE_SETTINGS) else [setting.lower() for setting in args.settings]
    else:
        parts = ["w" + "".join(map(str, args.bits)) + (f"a{args.activation_bits}" if args.activation_bits else "")]
    if args.per_channel:
        parts.append("per_channel")
    if args.train_split != "finetune":
        parts.append(f"train_{args.train_split}")
    return "_".join([f"finetune_{args.part}_resnet20", *parts]) + suffix(args)


def suffix(args: argparse.Namespace) -> str:
    """The --finetune overrides that change results (not the device), as a file-name part."""
    changed = sorted((key, value) for key, value in args.overrides.items() if key != "device")
    return "".join(f"_{key}_{re.sub(r'[^A-Za-z0-9.]+', '', str(value)).lower()}" for key, value in changed)


def markdown(rows: list[dict]) -> str:
    lines = [("| setting | method | mode | epochs | FP % | post-training | fine-tuned | change before -> after | "
              "paper change before -> after | fine-tune time |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paper_before = "" if r["paper_ptq_change"] is None else f"{r['paper_ptq_change']:+.2f} -> "
        paper = "n/a" if r["paper_finetuned_change"] is None else f"{paper_before}{r['paper_finetuned_change']:+.2f}"
        lines.append(f"| {r['setting']}{' per channel' if r.get('per_channel') else ''} | {r['method']} | {r['mode']}{' + KD' if r['distill'] else ''} | "
                     f"{r['epochs']} | {r['fp_accuracy']:.2f} | {r['ptq_accuracy']:.2f} | "
                     f"{r['finetuned_accuracy']:.2f} | {r['ptq_change']:+.2f} -> {r['finetuned_change']:+.2f} | "
                     f"{paper} | {r['finetune_s'] / 60:.1f} min |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
