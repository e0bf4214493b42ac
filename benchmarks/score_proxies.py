"""Which search-split score picks the quantized plan that is best on the test split?

The search ranks plans near its seeds that differ by a fraction of a point. Top-1 accuracy on a few
images sees only the images whose top class flips; KL divergence from the full-precision model's
predictions counts every image. Candidates: the seeds and random moves around the integer-program
seed (one to four tie groups a bit-width up or down, then settled onto the budget as the search
does). Each is scored on the whole search split and the test split. Reported per score and number of
search images: the Spearman correlation with test accuracy, and the mean test accuracy of the plan the
score picks on 200 random subsets of that many search images.

    python benchmarks/score_proxies.py --model resnet20 --bits 3 --plans 80 --jobs 2
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import statistics
import time
from pathlib import Path

import torch
from _common import write_results
from scipy import stats
from search_quality import with_budget

from oaq_search.evaluate import kl_per_image, logits
from oaq_search.pipeline import prepare
from oaq_search.plan import Plan
from oaq_search.schema import to_dict

SCORES = {"accuracy": 1.0, "cross-entropy": -1.0, "KL from FP": -1.0}  # sign: higher is better
IMAGES = (500, 1000, 2000, 5000)
SUBSETS = 200


def candidates(prepared, count: int, seed: int) -> dict[str, Plan]:
    """The seeds, then random moves around the integer-program seed, settled onto the budget; by plan key."""
    objective, space = prepared.objective, prepared.space
    seeds = {label: [params[name] for name in space.parameter_names] for params, label in prepared.seeds}
    plans = {}
    for choice in seeds.values():
        plan, _ = objective.plan_and_cost(choice)
        plans.setdefault(plan.key(), plan)
    generator = random.Random(seed)
    while len(plans) < count:
        choice = list(seeds["integer_program"])
        for group in generator.sample(range(len(choice)), generator.randint(1, 4)):
            top = len(space.settings[group]) - 1
            choice[group] = min(max(choice[group] + generator.choice((-1, 1)), 0), top)
        plan, _ = objective.plan_and_cost(objective.settle(choice))
        plans.setdefault(plan.key(), plan)
    return plans


def per_image(model: str, bits: float, plans: list[dict], part: int, parts: int) -> list[dict]:
    """Per-image correctness, cross-entropy and KL from FP for every `parts`-th plan, search and test splits."""
    torch.set_num_threads(1)
    prepared = prepared_for(model, bits)
    splits = {"search": prepared.splits.search, "test": prepared.splits.test}
    reference = {name: logits(prepared.model, split) for name, split in splits.items()}
    rows = []
    for index in range(part, len(plans), parts):
        started = time.perf_counter()
        quantized = prepared.objective.apply(Plan.from_dict(plans[index]))
        row = {"plan": index}
        for name, split in splits.items():
            outputs = logits(quantized, split)
            row[name] = {"accuracy": (outputs.argmax(1) == split.labels).float() * 100,
                         "cross-entropy": torch.nn.functional.cross_entropy(outputs, split.labels, reduction="none"),
                         "KL from FP": kl_per_image(reference[name], outputs)}
        rows.append(row)
        print(f"plan {index}: search {row['search']['accuracy'].mean():.2f} %, test {row['test']['accuracy'].mean():.2f} %"
              f" ({time.perf_counter() - started:.0f} s)", flush=True)
    return rows


def prepared_for(model: str, bits: float):
    config = with_budget("score-proxies", model, bits, 1, Path("/nonexistent"))
    config.search.measured_sensitivity_images = 0  # the data-free seeds are near enough the search's finalists
    return prepare(config)


def analyse(rows: list[dict], seed: int) -> list[dict]:
    test = [float(r["test"]["accuracy"].mean()) for r in rows]
    search_images = len(rows[0]["search"]["accuracy"])
    generator = torch.Generator().manual_seed(seed)
    table = []
    for images in (n for n in IMAGES if n <= search_images):
        subsets = [torch.randperm(search_images, generator=generator)[:images] for _ in range(SUBSETS)]
        for score, sign in SCORES.items():
            values = torch.stack([r["search"][score] for r in rows]) * sign  # plans x images
            first = values[:, :images].mean(1).tolist()  # the fixed first-N subset, as the search scores
            picked = [test[int(values[:, subset].mean(1).argmax())] for subset in subsets]
            table.append({"score": score, "search_images": images,
                          "spearman_with_test": stats.spearmanr(first, test).statistic,
                          "picked_test_mean": statistics.fmean(picked), "picked_test_worst": min(picked)})
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--bits", type=float, default=3.0)
    parser.add_argument("--plans", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="processes, one torch thread each (two cores: <= 2)")
    args = parser.parse_args()
    started = time.perf_counter()
    plans = [to_dict(plan) for plan in candidates(prepared_for(args.model, args.bits), args.plans, args.seed).values()]
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        parts = pool.starmap(per_image, [(args.model, args.bits, plans, part, args.jobs) for part in range(args.jobs)])
    rows = sorted((row for part in parts for row in part), key=lambda r: r["plan"])
    table = analyse(rows, args.seed)
    test = [float(r["test"]["accuracy"].mean()) for r in rows]
    lines = [f"{len(rows)} plans at {args.bits:g} average weight bits ({args.model}); their test accuracy "
             f"{min(test):.2f} to {max(test):.2f} %, median {statistics.median(test):.2f} %; integer-program seed "
             f"{test[0]:.2f} %. Wall time {(time.perf_counter() - started) / 60:.0f} min.", "",
             "| score | search images | Spearman with test accuracy | test accuracy of the plan it picks (mean, worst of "
             f"{SUBSETS} subsets) |", "|---|---|---|---|"]
    lines += [f"| {t['score']} | {t['search_images']} | {t['spearman_with_test']:+.3f} | {t['picked_test_mean']:.2f} "
              f"({t['picked_test_worst']:.2f}) |" for t in table]
    summary = [{"plan": r["plan"], **{f"{split}_{score}": float(r[split][score].mean()) for split in ("search", "test")
                                      for score in SCORES}} for r in rows]
    write_results(f"score_proxies_{args.model}_{args.bits:g}bits", table, "\n".join(lines), {"plans": summary})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
