"""The headline: test accuracy against weight-memory budget, before and after the same fine-tune.

For each model and average weight bits (first and last layer at 8 bits, counted in the budget),
with every layer's input at --activation-bits: uniform vanilla and uniform OAQ (the largest
uniform bit-width that fits), the integer program on sensitivity alone, and the full search.
Each plan is scored on the test split after post-training quantization and again after the same
fine-tune (--mode, --epochs x --finetune-images). Changes are against the checkpoint's own FP
accuracy; the wall time of every stage is recorded.

    python benchmarks/headline.py --models resnet20 --bits 4 3 2.5 2 --trials 40 --finetune-images 10000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import write_results
from search_quality import budget_bytes, run, with_budget

from oaq_search.config import FinetuneConfig
from oaq_search.pipeline import finetune_and_test, finish
from oaq_search.plan import Plan
from oaq_search.planning import PlanFactory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    parser.add_argument("--bits", type=float, nargs="+", default=[4.0, 3.0, 2.5, 2.0])
    parser.add_argument("--activation-bits", type=int, default=4)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--eval-images", type=int, default=1000, help="search-split images scored per trial")
    parser.add_argument("--mode", choices=("scale", "qat"), default="scale", help="the fine-tune every plan gets")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--finetune-images", type=int, default=10000, help="fine-tuning images per epoch")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="oaq-headline-"))
    finetune_config = FinetuneConfig(mode=args.mode, epochs=args.epochs, images_per_epoch=args.finetune_images)
    rows = []
    for model in args.models:
        for bits in args.bits:
            config = with_budget("headline", model, bits, args.trials, folder, eval_images=args.eval_images,
                                 activation_bits=args.activation_bits)
            prepared, study = run(config)
            search = finish(prepared, study)
            candidates = {"search": search.plan, "integer program": Plan.from_dict(
                next(t for t in study.trials if t.user_attrs.get("seed") == "integer_program").user_attrs["plan"])}
            factory, budget = prepared.objective.factory, budget_bytes(model, bits)
            fitting = [b for b in config.search.weight_bits if prepared.objective.cost_model.evaluate(
                prepared.graph, factory.uniform(b)).totals["weight_bytes"] <= budget]
            if fitting:  # vanilla has no (s, T) to choose, so its factory needs no calibration images
                vanilla = PlanFactory(model, prepared.model, prepared.graph, "vanilla")
                candidates[f"uniform vanilla W{max(fitting)}"] = vanilla.uniform(max(fitting), args.activation_bits)
                candidates[f"uniform OAQ W{max(fitting)}"] = factory.uniform(max(fitting), args.activation_bits)
            for method, plan in candidates.items():
                started = time.perf_counter()
                tuned = finetune_and_test(prepared.model, plan, prepared.splits, finetune_config,
                                          folder / f"{model}-{bits}-{method.replace(' ', '_')}")
                scores = tuned.scores
                rows.append({
                    "model": model, "average_bits": bits, "budget_kib": budget / 1024, "method": method,
                    "activation_bits": args.activation_bits,
                    "plan_kib": prepared.objective.cost_model.evaluate(prepared.graph, plan).totals["weight_bytes"] / 1024,
                    "fp_test": scores["fp_test_accuracy"], "ptq_test": scores["ptq_test_accuracy"],
                    "finetuned_test": scores["test_accuracy"],
                    "ptq_change": scores["ptq_test_accuracy"] - scores["fp_test_accuracy"],
                    "finetuned_change": scores["test_accuracy"] - scores["fp_test_accuracy"],
                    "seconds": {**(prepared.seconds if method in ("search", "integer program") else {}),
                                "finetune": round(tuned.seconds, 1),
                                "finetune_and_test": round(time.perf_counter() - started, 1)},
                    "trials": len(study.trials) if method == "search" else None,
                })
                print({k: v for k, v in rows[-1].items() if k != "seconds"}, flush=True)
            write_results(f"headline_{'_'.join(args.models)}", rows, markdown(rows),
                          {"finetune": {"mode": args.mode, "epochs": args.epochs, "images_per_epoch": args.finetune_images},
                           "trials": args.trials, "eval_images": args.eval_images})


def markdown(rows: list[dict]) -> str:
    lines = [("| model | avg bits (budget KiB) | method | plan KiB | post-training change | fine-tuned change | "
              "fine-tune s |"), "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['average_bits']:g} ({r['budget_kib']:.1f}) | {r['method']} | "
                     f"{r['plan_kib']:.1f} | {r['ptq_change']:+.2f} ({r['ptq_test']:.2f}) | "
                     f"{r['finetuned_change']:+.2f} ({r['finetuned_test']:.2f}) | {r['seconds']['finetune']:.0f} |")
    lines.append("")
    lines.append(f"Changes are test-split points against full precision ({rows[0]['fp_test']:.2f} % for "
                 f"{rows[0]['model']}); activations at {rows[0]['activation_bits']} bits (first and last layer inputs "
                 f"at 8).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
