"""Does the seeded search beat uniform OAQ and its own integer-program seed, and how fast does it get there?

Part A (--part quality): budgets at 3 and 2.5 average weight bits (first and last layer at 8 bits,
counted): the best plan of a 100-trial seeded search vs uniform OAQ, the integer-program seed the
search starts from (over each tie group's measured output KL) and the integer program over the
sensitivity table alone (one grid, no plan scored on images: what a user gets without searching), each
scored once on the test split with the same BN correction.
Part B (--part efficiency): trials the seeded search (seeds, then TPE with local search around the
best plan) needs to match the best search-split accuracy unseeded TPE reaches in 100 trials, median
over 3 sampler seeds; seeded TPE without local search, and random search, beside it. Score on most
of the search split (4,000 images, apart from the 512 the measured sensitivity probes): the best of
100 scores on a small subset is mostly that subset's luck, not a better plan.

    python benchmarks/search_quality.py --part quality --model resnet20 --bits 3 2.5 --eval-images 2000 --screen-images 500
    python benchmarks/search_quality.py --part quality --model resnet56 --bits 3 --eval-images 2000 --screen-images 500
    python benchmarks/search_quality.py --part quality --model resnet56 --bits 2.5 --eval-images 2000 --screen-images 500
    python benchmarks/search_quality.py --part quality --model resnet20 --bits 3 --eval-images 1000 --score kl
    python benchmarks/search_quality.py --part quality --model resnet20 --bits 2.5 --eval-images 1000 --score kl
    python benchmarks/search_quality.py --part quality --model resnet20 --bits 3 2.5 --eval-images 2000 --screen-images 500 --cost-model memory-base3
    python benchmarks/search_quality.py --part quality --model resnet20 --bits 3 2.5 --eval-images 2000 --screen-images 500 --grid uniform midrise
    python benchmarks/search_quality.py --part quality --model resnet20 --checkpoint resnet20_scratch --bits 3 2.5 --eval-images 2000 --screen-images 500
    python benchmarks/search_quality.py --part efficiency --model resnet20 --bits 3 --eval-images 4000 --screen-images 500 --jobs 2

Part A writes benchmarks/results/search_quality_<model>.json, or ..._<model>_<bits>bits.json for
budgets other than the default 3 and 2.5, so runs for one budget do not overwrite each other; with
`--score kl` (trials scored by KL from full precision, no screening) the name ends in _kl, and with
another `--cost-model` (memory-base3: 2-bit layers' ternary codes five to a byte) in its name, and with
several `--grid`s (each tie group takes the grid that measures best at its bits) their names. With
`--checkpoint resnet20_scratch` (benchmarks/checkpoints: a ResNet-20 that never saw the search split) the
name starts search_quality_resnet20_scratch. Results from runs where a finalist replaces the seed only
when better by `--seed-margin` standard errors (the default since 2026-12-02) end in _seed-margin<m>;
files without it come from the rule before, where the best re-scored finalist won.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import optuna
import torch
from _common import SHARED, checkpoint, write_results

from oaq_search.config import SearchConfig, StudyConfig, load_study_config
from oaq_search.data import ImageSplit
from oaq_search.evaluate import SCORES, accuracy, correct, paired_difference
from oaq_search.grids import GRIDS
from oaq_search.engine import open_study
from oaq_search.pipeline import finish_study, layer_graph, load_model, prepare
from oaq_search.plan import Plan
from oaq_search.ptq import post_training_quantize
from oaq_search.queue import work
from oaq_search.seeds import integer_program_seed


def study_config(label: str, model: str, bits: float, n_trials: int, folder: Path, weights: str | None = None,
                 **search) -> StudyConfig:
    """`weights`: the checkpoint's name (see --checkpoint); the model's own by default."""
    config = load_study_config(Path(__file__).resolve().parents[1] / "studies/quickstart.toml")
    config.name = f"{weights or model}-{bits}-{label}-{search.get('seed', 0)}"
    config.model.name, config.model.checkpoint = model, str(checkpoint(weights or model))
    config.data.root = str(SHARED / "data/cifar10")
    config.output_dir = str(folder / config.name)
    config.search.n_trials, config.search.weight_bits = n_trials, [2, 3, 4, 5, 6, 8]
    for key, value in search.items():
        setattr(config.search, key, value)
    return config


def budget_bytes(model: str, bits: float) -> float:
    """Bytes of every layer at `bits` on average, first and last at 8, plus every scale and bias."""
    return graph_budget_bytes(layer_graph(model, load_model(model)), bits)


def graph_budget_bytes(graph, bits: float) -> float:
    """`budget_bytes` for any model's layer graph."""
    pinned = {graph.names[0]: 8, graph.names[-1]: 8}
    codes = sum(graph.info(n).weight_count * pinned.get(n, bits) / 8 for n in graph.names)
    extras = sum(4 * 2 + 4 * (graph.info(n).params - graph.info(n).weight_count) for n in graph.names)
    return codes + extras


class _Reached(Exception):
    pass


def run(config: StudyConfig, stop_at: float | None = None):
    """Prepare and run a study; with `stop_at`, stop once a trial reaches that search accuracy."""
    prepared = prepare(config)
    study, storage = open_study(prepared, create=True)
    started = time.perf_counter()

    def reached(trial) -> bool:  # pruned trials carry their screening score: only full scores count
        return stop_at is not None and trial.state == optuna.trial.TrialState.COMPLETE and trial.values[0] >= stop_at

    def check(trial):
        if reached(trial):
            raise _Reached

    try:
        if not any(reached(trial) for trial in study.trials):  # a resumed run that already matched stays stopped
            work(study, storage, prepared.objective, on_finished=check)
    except _Reached:
        pass
    prepared.seconds["search"] = time.perf_counter() - started
    return prepared, study


def with_budget(label: str, model: str, bits: float, n_trials: int, folder: Path, weights: str | None = None,
                **search) -> StudyConfig:
    config = study_config(label, model, bits, n_trials, folder, weights, **search)
    config.budget = {"memory": f"{budget_bytes(model, bits):.0f}B"}
    return config


def table_integer_program(config: StudyConfig) -> Plan:
    """The integer program over `config`'s sensitivity table alone: no measured output KL, the first grid."""
    table = copy.deepcopy(config)
    table.search.measured_sensitivity_images, table.search.grid = 0, config.search.grids[0]
    objective = prepare(table).objective
    return objective.plan_and_cost(integer_program_seed(objective.problem))[0]


def quality(model: str, bits_list: list[float], n_trials: int, folder: Path, eval_images: int,
            screen_images: int, score: str, cost_model: str, grids: list[str], measured_images: int,
            weights: str | None = None, seed_margin: float = SearchConfig.seed_margin) -> list[dict]:
    rows = []
    grid = grids[0] if len(grids) == 1 else grids
    for bits in bits_list:
        label = f"seeded-{score}-{cost_model}" + ("" if grids == ["uniform"] else "-" + "-".join(grids))
        config = with_budget(label, model, bits, n_trials, folder, weights,
                             eval_images=eval_images, screen_images=screen_images, score=score, cost_model=cost_model,
                             grid=grid, measured_sensitivity_images=measured_images, seed_margin=seed_margin)
        prepared, study = run(config)
        result = finish_study(config, prepared, study)
        test_split = prepared.splits.test
        fp = result.fp_test_accuracy

        def test_accuracy(plan: Plan) -> float:
            return accuracy(post_training_quantize(prepared.model, plan, prepared.splits.search), test_split)

        seed_trial = next(t for t in study.trials if t.user_attrs.get("seed") == "integer_program")
        seed_plan = Plan.from_dict(seed_trial.user_attrs["plan"])
        uniform_bits = max(b for b in config.search.weight_bits if b <= bits)
        uniform = prepared.objective.factory.uniform(uniform_bits)
        rows.append({
            "model": model, "checkpoint": Path(config.model.checkpoint).name, "average_bits": bits, "score": score,
            "cost_model": cost_model, "grids": grids,
            "budget_kib": budget_bytes(model, bits) / 1024,
            "trials": len(study.trials), "eval_images": eval_images, "screen_images": screen_images,
            "measured_images": measured_images, "seed_margin": seed_margin, "fp_test": fp,
            "search_test": result.test_accuracy, "search_kib": result.plan.totals["weight_bytes"] / 1024,
            "search_trial": result.plan.metadata["trial"], "search_seed": result.plan.metadata["seed"],
            "integer_program_test": test_accuracy(seed_plan),
            "integer_program_search": seed_trial.value,
            "table_integer_program_test": test_accuracy(table_integer_program(config)),
            "sensitivity_metric": config.search.sensitivity_metric,
            "uniform_test": test_accuracy(uniform), "uniform_bits": uniform_bits,
            "uniform_kib": prepared.objective.cost_model.evaluate(prepared.graph, uniform).totals["weight_bytes"] / 1024,
            "search_minus_seed": {name: pick_minus_seed(prepared.model, seed_plan, result.plan, prepared.splits.search,
                                                          split)
                                  for name, split in (("scored", prepared.splits.search.subset(eval_images)),
                                                      ("search", prepared.splits.search), ("test", test_split))},
            "seconds": prepared.seconds,
        })
        print(rows[-1], flush=True)
    return rows


def efficiency(model: str, bits: float, n_trials: int, folder: Path, seeds: int, eval_images: int,
               screen_images: int, jobs: int) -> list[dict]:
    """One row per sampler seed; `jobs` seeds run at once, one torch thread each (two cores: jobs <= 2)."""
    run_seed = partial(efficiency_for_seed, model, bits, n_trials, folder, eval_images, screen_images)
    if jobs == 1:
        return [run_seed(seed) for seed in range(seeds)]
    with multiprocessing.get_context("spawn").Pool(jobs, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        return pool.map(run_seed, range(seeds), chunksize=1)


def efficiency_for_seed(model: str, bits: float, n_trials: int, folder: Path, eval_images: int, screen_images: int,
                        seed: int) -> dict:
    """TPE without seeds sets the target; the seeded search stops once it matches it (only the count matters)."""
    curves = {}
    for label, search in (("tpe", {"seeds": [], "sampler": "tpe", "local_search": 0.0}),
                          ("random", {"seeds": [], "sampler": "random"}),
                          ("seeded", {"sampler": "tpe"}),
                          ("seeded_tpe", {"sampler": "tpe", "local_search": 0.0})):
        target = curves["tpe"][-1] if label.startswith("seeded") else None
        _, study = run(with_budget(label, model, bits, n_trials, folder, seed=seed, eval_images=eval_images,
                                   screen_images=screen_images, **search), stop_at=target)
        values = [t.value if t.state == optuna.trial.TrialState.COMPLETE else float("-inf")  # pruned: no full score
                  for t in sorted(study.trials, key=lambda t: t.number)
                  if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
        curves[label] = [max(values[: i + 1]) for i in range(len(values))]
    target = curves["tpe"][-1]
    to_match = {label: next((i + 1 for i, v in enumerate(curve) if v >= target), None)
                for label, curve in curves.items()}
    row = {"model": model, "average_bits": bits, "seed": seed, "eval_images": eval_images,
           "screen_images": screen_images, "tpe_best_in_100": target, "random_best_in_100": curves["random"][-1],
           "seeded_best": curves["seeded"][-1], "trials_to_match": to_match, "curves": curves}
    print({k: v for k, v in row.items() if k != "curves"}, flush=True)
    return row


def median_trials_to_match(rows: list[dict]) -> dict[str, float]:
    """Per sampler, the median over seeds of the trials it needed; not matched counts as one more than TPE ran."""
    return {label: statistics.median(r["trials_to_match"][label] or len(r["curves"]["tpe"]) + 1 for r in rows)
            for label in ("seeded", "seeded_tpe", "random")}


def pick_minus_seed(model: torch.nn.Module, seed: Plan, pick: Plan, calibration: ImageSplit,
                      split: ImageSplit) -> dict[str, float]:
    """`pick`'s accuracy minus `seed`'s on `split`, image by image: the difference, the images they disagree
    on, and the difference's standard error (points), which says whether the search's gain is more than noise."""
    def correct_on_split(plan: Plan) -> torch.Tensor:
        return correct(post_training_quantize(model, plan, calibration), split)

    picked, seeded = correct_on_split(pick), correct_on_split(seed)
    difference, standard_error = paired_difference(100.0 * picked.double(), 100.0 * seeded.double())
    return {"difference": difference, "disagreements": int((picked != seeded).sum()),
            "standard_error": standard_error, "images": len(picked)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("quality", "efficiency"), required=True)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--checkpoint", help="quality: weights <name>_cifar10jpeg.pt from ../shared/models or "
                        "benchmarks/checkpoints (default: the model's own)")
    parser.add_argument("--bits", type=float, nargs="+", default=[3.0, 2.5])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--eval-images", type=int, default=1000, help="search-split images scored per trial")
    parser.add_argument("--screen-images", type=int, default=0, help="score this many first; Optuna prunes there")
    parser.add_argument("--score", choices=SCORES, default="accuracy", help="quality: what trials are scored by")
    parser.add_argument("--cost-model", default="memory", help="quality: the cost model the budget is in")
    parser.add_argument("--grid", nargs="+", choices=GRIDS, default=["uniform"],
                        help="quality: the weight grids; several: each tie group takes the one that measures best")
    parser.add_argument("--measured-images", type=int, default=SearchConfig.measured_sensitivity_images,
                        help="quality: images for each group's measured output KL (0: the sensitivity table seeds)")
    parser.add_argument("--seed-margin", type=float, default=SearchConfig.seed_margin,
                        help="quality: standard errors a finalist must beat the integer-program seed by")
    parser.add_argument("--jobs", type=int, default=1, help="efficiency: sampler seeds run at once, one thread each")
    parser.add_argument("--folder", type=Path, help="studies' folder: an interrupted benchmark resumes its studies")
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="oaq-bench-"))
    if args.part == "quality":
        rows = quality(args.model, args.bits, args.trials, folder, args.eval_images, args.screen_images, args.score,
                       args.cost_model, args.grid, args.measured_images, args.checkpoint, args.seed_margin)
        lines = ["| model | avg bits | budget KiB | uniform OAQ (bits, KiB) test | integer program on the table test | "
                 "integer program (seed) test | search test (KiB, trial) | search - seed: scored images, search split, "
                 "test (± standard error) | FP test |",
                 "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['average_bits']} | {r['budget_kib']:.1f} | {r['uniform_test']:.2f} "
                  f"(W{r['uniform_bits']}, {r['uniform_kib']:.1f}) | {r['table_integer_program_test']:.2f} "
                  f"({r['sensitivity_metric']}) | {r['integer_program_test']:.2f} | "
                  f"{r['search_test']:.2f} ({r['search_kib']:.1f}, #{r['search_trial']}) | "
                  + ", ".join(f"{d['difference']:+.2f} ± {d['standard_error']:.2f}" for d in r["search_minus_seed"].values())
                  + f" | {r['fp_test']:.2f} |" for r in rows]
        budgets = "" if args.bits == parser.get_default("bits") else "_" + "_".join(f"{b:g}" for b in args.bits) + "bits"
        scored = "" if args.score == "accuracy" else f"_{args.score}"
        costed = "" if args.cost_model == "memory" else f"_{args.cost_model}"
        gridded = "" if args.grid == ["uniform"] else "_" + "-".join(args.grid)
        margined = f"_seed-margin{args.seed_margin:g}" if args.seed_margin else ""
        write_results(f"search_quality_{args.checkpoint or args.model}{budgets}{scored}{costed}{gridded}{margined}", rows,
                      "\n".join(lines))
    else:
        rows = efficiency(args.model, args.bits[0], args.trials, folder, args.seeds, args.eval_images,
                          args.screen_images, args.jobs)
        median = median_trials_to_match(rows)
        lines = ["| seed | unseeded TPE best of 100 | random best of 100 | trials to match: seeded (local search) | "
                 "seeded TPE only | random |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['seed']} | {r['tpe_best_in_100']:.2f} | {r['random_best_in_100']:.2f} | "
                  f"{r['trials_to_match']['seeded']} | {r['trials_to_match']['seeded_tpe']} | "
                  f"{r['trials_to_match']['random']} |" for r in rows]
        lines += ["", f"Median trials to match unseeded TPE's 100-trial best: seeded search with local search "
                      f"{median['seeded']}, seeded TPE only {median['seeded_tpe']}, random {median['random']} "
                      f"({args.trials + 1} means not matched)."]
        write_results(f"search_efficiency_{args.model}", rows, "\n".join(lines))


if __name__ == "__main__":
    main()
