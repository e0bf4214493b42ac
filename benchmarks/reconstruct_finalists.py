"""Would reconstructing the finalists change which plan a search picks? Finalists ranked both ways.

A search (ResNet-20, --bits average weight bits, 8-bit inputs, --trials trials) re-scores its best
--finalists trials and the integer-program seed on the whole search split, rounded to nearest, and
picks the best. Here every finalist is also reconstructed (the `[ptq]` defaults, on the search
split's first 1,024 images) and scored on the search split's other images and on the test split, so
the two rankings and what each pick scores on test can be compared.

    python benchmarks/reconstruct_finalists.py --bits 2.5 --finalists 6
"""

from __future__ import annotations

import argparse

import torch
from _common import SHARED, checkpoint, write_results
from reconstruction import reconstructed_copy, searched
from scipy.stats import spearmanr

from oaq_search.config import PtqConfig
from oaq_search.data import load_cifar10
from oaq_search.evaluate import accuracy
from oaq_search.objective import FINALIST_SCORES, FINALIST_WINNER
from oaq_search.pipeline import load_model
from oaq_search.plan import Plan
from oaq_search.ptq import post_training_quantize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--bits", type=float, default=2.5)
    parser.add_argument("--finalists", type=int, default=6)
    parser.add_argument("--trials", type=int, default=32)
    args = parser.parse_args()
    splits = load_cifar10(SHARED / "data" / "cifar10")
    config = PtqConfig(reconstruct=True)
    held_out = splits.search.last(len(splits.search) - config.images)  # images reconstruction does not fit on
    model = load_model(args.model, checkpoint(args.model))
    fp = accuracy(model, splits.test, progress=False)
    result = searched(args.model, model, splits, args.bits, 8, args.trials, "memory", finalists=args.finalists)
    study = result.study
    search_scores = study.user_attrs[FINALIST_SCORES]
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    rows = []
    for number in sorted(map(int, search_scores)):
        plan = Plan.from_dict(trials[number].user_attrs["plan"])
        nearest = post_training_quantize(model, plan, splits.search)
        reconstructed, seconds, _ = reconstructed_copy(nearest, model, plan, splits, config)
        rows.append({"trial": number, "seed": trials[number].user_attrs.get("seed"),
                     "finalist_score": search_scores[str(number)],
                     "nearest_held_out": accuracy(nearest, held_out, progress=False),
                     "nearest_test": accuracy(nearest, splits.test, progress=False) - fp,
                     "reconstructed_held_out": accuracy(reconstructed, held_out, progress=False),
                     "reconstructed_test": accuracy(reconstructed, splits.test, progress=False) - fp,
                     "seconds": seconds})
        print(rows[-1], flush=True)
    _write(rows, study.user_attrs[FINALIST_WINNER]["trial"], fp, args)


def _write(rows: list[dict], winner: int, fp: float, args) -> None:
    by_nearest = max(rows, key=lambda r: r["nearest_held_out"])
    by_reconstructed = max(rows, key=lambda r: r["reconstructed_held_out"])
    rho = spearmanr([r["nearest_held_out"] for r in rows], [r["reconstructed_held_out"] for r in rows])[0]
    lines = [f"{args.model} (FP {fp:.2f} %), search at {args.bits:g} average weight bits, 8-bit inputs, {args.trials} "
             f"trials, {len(rows)} finalists (the best {args.finalists} and the integer-program seed); "
             f"reconstruction with the `[ptq]` defaults on the search split's first 1,024 images, scored on its "
             f"other images (held out) and on the test split (change vs FP); {torch.get_num_threads()} threads.", "",
             "| trial | seed | finalist score (whole search split, nearest) | held out, nearest | held out, reconstructed "
             "| test, nearest | test, reconstructed | reconstruction time |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mark = " (search's pick)" if r["trial"] == winner else ""
        lines.append(f"| {r['trial']}{mark} | {r['seed'] or ''} | {r['finalist_score']:.2f} | {r['nearest_held_out']:.2f} | "
                     f"{r['reconstructed_held_out']:.2f} | {r['nearest_test']:+.2f} | {r['reconstructed_test']:+.2f} | "
                     f"{r['seconds']:.0f} s |")
    lines += ["", f"Spearman of the held-out scores, nearest against reconstructed: {rho:.2f}. Best held out rounded "
              f"to nearest: trial {by_nearest['trial']} ({by_nearest['reconstructed_test']:+.2f} on test once "
              f"reconstructed); best held out reconstructed: trial {by_reconstructed['trial']} "
              f"({by_reconstructed['reconstructed_test']:+.2f})."]
    text = "\n".join(lines)
    print(text)
    print(f"written to {write_results(f'reconstruct_finalists_{args.model}_{args.bits:g}bits', rows, text)}")


if __name__ == "__main__":
    main()
