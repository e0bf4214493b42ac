"""The search engine: a model, its data and the search settings in; a study that finds the best plan out.

It knows nothing of study files or data sets: `pipeline` (study files) and `api.search` (Python)
load a model and its `Splits` their own way and build the same `Engine`. Everything a search needs
is built once here (layer graph, sensitivity, search space, seeds, objective); `open_study`, `run_trials`
and `finish` then create or join the Optuna study, work through its queue and pick the best plan.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import optuna
import torch
from torch import nn

import hwmodels
from hwmodels.base import CostModel

from .bn_correction import BatchNormCorrector
from .budget import Budget
from .cache import cached_json
from .config import PtqConfig, SearchConfig
from .data import ImageSplit, Splits
from .errors import UserError
from .evaluate import accuracy, image_scorer, reference_accuracy, split_scorer
from .graph import LayerGraph, build_layer_graph
from .layout import choose_layout
from .oaq import REVISION
from .objective import (FINALIST_SCORES, RECONSTRUCTED_PICK, Objective, Scorer, allocation_problem, best_trial,
                        check_feasible, finalist_score, incumbent_params, standard_errors_above)
from .plan import Plan
from .planning import PlanFactory, uniform_activation_bits
from .ptq import CALIBRATION_IMAGES, post_training_quantize, reconstruct_plan, requantize
from .prefix import PrefixCache
from .pruning import ScreeningPruner
from .progress import bar, note, silenced, stage
from .queue import FINISHED, fill_queue, work
from .samplers import make_sampler
from .schema import to_dict
from .seeds import SEEDS
from .sensitivity import SensitivityTable, compute_sensitivity
from .sensitivity.measured import cached_group_sensitivity, measure_group_sensitivity
from .space import SearchSpace
from .storage import open_storage

REPORT_FACTS = "report"  # study attribute: report_facts()
OUTCOME = "outcome"  # study attribute: what `finish` (and a fine-tune) made of the best plan, for the report
# Search settings that may change between runs of one study: how long it runs, how workers keep alive,
# batch sizes (speed only), and the final re-scoring (redone whenever it changes). Every other setting
# shapes the trials, so it is part of the study's fingerprint.
RUN_SETTINGS = ("n_trials", "heartbeat_seconds", "grace_seconds", "batch_size", "finalists", "seed_margin")


@dataclass
class Engine:
    """Everything a study needs, built once by `build_engine`."""

    name: str  # the study's
    storage_url: str  # an Optuna storage URL, or "memory"
    model_name: str  # what plans name as their model
    search: SearchConfig
    model: nn.Module
    splits: Splits
    graph: LayerGraph
    space: SearchSpace
    objective: Objective
    sensitivity: SensitivityTable | None  # the per-layer table, None when nothing reads it (see build_engine)
    seeds: list[tuple[dict[str, int], str]]
    fingerprint: dict[str, str]
    custom_score: bool = False  # scored by the user's callable: no per-image scores to re-score finalists with
    seconds: dict[str, float] = field(default_factory=dict)
    progress: bool | None = None  # how stages report: see oaq_search.progress


def build_engine(name: str, storage_url: str, model: nn.Module, model_name: str, splits: Splits, search: SearchConfig,
                 budget: Budget, identity: Mapping[str, str], leaf_modules: Iterable[str] = (),
                 score: Scorer | None = None, progress: bool | None = None) -> Engine:
    """The engine for searching `model` on `splits` under `budget`.

    `identity` names the model and its weights in the study's fingerprint (a resumed study must match);
    `score`, a quantized model -> a number (higher is better), replaces the search split's accuracy or KL;
    `progress`: None shows it on a terminal and as log lines otherwise, True a bar, False nothing."""
    started = time.perf_counter()
    choose_layout(model, next(splits.search.batches(2))[0])
    graph = build_layer_graph(model, splits.input_shape, leaf_modules)
    cost_model = hwmodels.get_cost_model(search.cost_model)
    loaded = time.perf_counter()
    sensitivity = None  # the table is read by pruning, and by seeds and repair when they are not measured
    if search.prune_sensitivity is not None or not search.measured_sensitivity_images:
        with stage(f"sensitivity table ({search.sensitivity_metric})", progress), silenced(progress is False):
            sensitivity = compute_sensitivity(model, graph, [search.sensitivity_metric], methods=[search.method],
                                              grid=search.grids[0], data=splits.search)
    sensitivity_s = time.perf_counter() - loaded
    space = SearchSpace.from_graph(graph, search.weight_bits, search.first_last_bits, sensitivity,
                                   search.sensitivity_metric, search.method, search.prune_sensitivity, cost_model,
                                   search.grids, search.searched_activation_bits)
    calibration = next(splits.search.batches(CALIBRATION_IMAGES))[0]
    factory = PlanFactory(model_name, model, graph, search.method, search.grids[0], search.per_channel,
                          calibration if search.outlier_rule == "output_error" else None,
                          uniform_activation_bits(graph, search.default_activation_bits, search.first_last_bits),
                          cost_model.code_packing, cache_dir="default")
    _check_metrics(cost_model.evaluate(graph, factory.uniform(max(search.weight_bits))).totals, budget, search)
    problem = allocation_problem(space, factory, cost_model, graph, budget, sensitivity, search.sensitivity_metric,
                                 search.method, [search.pareto_metric] if search.pareto_metric else [])
    check_feasible(problem)
    corrector = BatchNormCorrector(model, calibration) if search.bn_correction else None
    trial_model = copy.deepcopy(model)  # wrapped and re-quantized in place by every trial
    quantizer = {"groups": space.groups, "bits": space.describe(), "pinned": space.pinned,
                 **{key: value for key, value in to_dict(search).items() if key not in (*RUN_SETTINGS, "cost_model")}}
    measuring = time.perf_counter()
    if search.measured_sensitivity_images:
        def quantized(choice: list[int]) -> nn.Module:
            return requantize(trial_model, factory.from_settings(space.layer_settings(choice)), calibration, corrector)

        problem.sensitivity = _measured_sensitivity(quantized, space, model, splits.search, calibration,
                                                    search.measured_sensitivity_images,
                                                    {**_measured_key(search, space), "model": identity["model"]},
                                                    progress)
    measured_s = time.perf_counter() - measuring
    space, problem = space.without_dominated(problem)
    scorers = _scorers(search, splits.search, model, score)
    objective = Objective(trial_model, graph, space, factory, cost_model, budget, problem, scorers,
                          corrector, search.pareto_metric, calibration, search.fill_budget)
    seeds = []
    with stage(f"seeds ({', '.join(search.seeds)})", progress):
        for seed_name in search.seeds:
            choice = SEEDS.get(seed_name)(problem)
            if choice is not None:
                seeds.append((space.params(choice), seed_name))
    fingerprint = {
        **identity,
        "search split": splits.search.subset(search.eval_images).fingerprint(),
        "search space": json.dumps({**quantizer, "custom score": score is not None,
                                    # the settings kept: measured on each machine, so workers must agree on them
                                    **({} if space.weight_bits_only else {"settings kept": space.describe()})},
                                   sort_keys=True),
        "cost model": cost_model.fingerprint(),
        "budget": json.dumps(budget.limits, sort_keys=True),
    }
    seconds = {"setup": loaded - started, "sensitivity": sensitivity_s, "measured sensitivity": measured_s,
               "seeds": time.perf_counter() - loaded - sensitivity_s - measured_s}
    return Engine(name, storage_url, model_name, search, model, splits, graph, space, objective, sensitivity, seeds,
                  fingerprint, score is not None, seconds, progress)


def _check_metrics(totals: Mapping[str, float], budget: Budget, search: SearchConfig) -> None:
    """Before any work: the cost model reports every budgeted metric and the Pareto metric."""
    for metric in [*budget.limits, *([search.pareto_metric] if search.pareto_metric else [])]:
        if metric not in totals:
            raise UserError(f"cost model {_name(search.cost_model)!r} reports no {metric!r} (it reports "
                            f"{', '.join(totals)}): choose a cost model that does, or drop that budget or pareto_metric")


def _scorers(search: SearchConfig, split: ImageSplit, model: nn.Module, score: Scorer | None) -> list[Scorer]:
    """What scores a trial: the user's callable, or the search split's accuracy or KL, screened on a
    smaller subset first when `screen_images` is set."""
    if score is not None:
        return [score]
    scorers = [split_scorer(search.score, split.subset(search.eval_images), model, search.batch_size)]
    if 0 < search.screen_images < search.eval_images:
        scorers.insert(0, split_scorer(search.score, split.subset(search.screen_images), model, search.batch_size))
    return scorers


def _measured_key(search: SearchConfig, space: SearchSpace) -> dict:
    """What the measured per-group sensitivity depends on: its cache key (kept as it was before
    the fingerprint took every setting, so cached measurements stay valid)."""
    return {"groups": space.groups, "bits": space.describe(), "pinned": space.pinned, "method": search.method,
            "grid": search.grid, "per_channel": search.per_channel, "bn_correction": search.bn_correction,
            "activation_bits": search.activation_bits, "outlier_rule": search.outlier_rule,
            "measured_sensitivity_images": search.measured_sensitivity_images}


def _measured_sensitivity(quantized: Callable[[list[int]], nn.Module], space: SearchSpace, model: nn.Module,
                          search_split: ImageSplit, calibration: torch.Tensor, images: int, settings: dict,
                          progress: bool | None) -> np.ndarray:
    """Per group and setting, the output KL with only that group quantized, on the search split's last
    `images` (cached on disk by `settings`, the data and the weights); each move computed from its
    group's first block on when the blocks' outputs on these and the calibration images fit in memory."""
    probe = next(search_split.last(images).batches(images))[0]

    def measure() -> np.ndarray:  # only when the measurement is not cached
        prefix = PrefixCache(model, probe[:1], (nn.Conv2d, nn.Linear))
        return measure_group_sensitivity(quantized, [len(s) for s in space.settings], model, probe, progress,
                                         prefix if prefix.fits(model, probe, images + len(calibration)) else None,
                                         space.groups)

    return cached_group_sensitivity({**settings, "search split": search_split.fingerprint()}, model, measure)


def open_study(engine: Engine, create: bool, worker_index: int = 0,
               storage: optuna.storages.BaseStorage | None = None) -> tuple[optuna.Study, optuna.storages.BaseStorage]:
    """Create the study (`create`) or join it, after checking nothing it depends on has changed."""
    search = engine.search
    storage = storage or open_storage(engine.storage_url, search.heartbeat_seconds, search.grace_seconds)
    directions = ["maximize", "minimize"] if search.pareto_metric else ["maximize"]
    try:
        study = optuna.load_study(study_name=engine.name, storage=storage)
    except KeyError:
        if not create:
            raise UserError(f"study {engine.name!r} does not exist in {engine.storage_url}: create it first with "
                            f"`oaq-search create` (workers must not race to create it)") from None
        study = optuna.create_study(study_name=engine.name, storage=storage, directions=directions)
        study.set_user_attr("fingerprint", engine.fingerprint)
    stored = study.user_attrs.get("fingerprint", {})
    changed = [part for part in engine.fingerprint if stored.get(part) != engine.fingerprint[part]]
    if changed:
        raise UserError(f"study {engine.name!r} in {engine.storage_url} was started with a different "
                        f"{', '.join(changed)}: use a new study name or the original settings")
    # Offset the sampler seed by the trials already stored and by worker, so no run replays another's samples.
    study.sampler = make_sampler(search.sampler, search.seed + len(study.get_trials(deepcopy=False)) + 1000 * worker_index,
                                 bool(search.pareto_metric), search.local_search, incumbent_params,
                                 engine.objective.settle_params)
    screen_images = search.screen_images  # the pruner is only asked when a screening scorer runs
    study.pruner = ScreeningPruner(screen_images) if screen_images else optuna.pruners.NopPruner()
    if create:
        fill_queue(study, storage, search.n_trials, engine.seeds)
    if REPORT_FACTS not in study.user_attrs:
        study.set_user_attr(REPORT_FACTS, report_facts(engine))
    engine.objective.remember(study)
    return study, storage


def report_facts(engine: Engine) -> dict:
    """What `report` needs beyond the trials, kept in the study so it reads the study alone."""
    metric, method, table = engine.search.sensitivity_metric, engine.search.method, engine.sensitivity
    if table is not None:
        bits = min(table.bits)
        label, scores = f"{metric} ({method}) at {bits} bits", {
            name: table.score(metric, method, name, bits) for name in engine.graph.names}
    else:  # the measured KL the seeds used: each layer gets its group's, at the group's cheapest setting
        label, scores = "measured KL, its group alone at its fewest bits", dict.fromkeys(engine.graph.names, 0.0)
        for group, row in zip(engine.space.groups, engine.objective.problem.sensitivity):
            scores.update(dict.fromkeys(group, float(row[0])))
    return {"model": engine.model_name, "score": "custom" if engine.custom_score else engine.search.score,
            "seed_margin": engine.search.seed_margin, "budget": engine.objective.budget.limits,
            "pinned": sorted(engine.space.pinned), "sensitivity_label": label, "sensitivity": scores}


def run_trials(engine: Engine, study: optuna.Study, storage: optuna.storages.BaseStorage) -> int:
    """Work through the study's queue, showing progress; returns how many trials this process ran."""
    counter = bar(engine.search.n_trials, "search trials", engine.progress, finished_trials(study), leave=True)
    grace = engine.search.grace_seconds

    def waiting(numbers: list[int]) -> None:
        note(f"search: waiting on trial(s) {', '.join(map(str, numbers))} running in other workers; a worker "
             f"silent for {grace} s has its trial retried here", engine.progress)

    started = time.perf_counter()
    try:
        return work(study, storage, engine.objective, on_finished=lambda _trial: counter.update(1), on_waiting=waiting)
    finally:
        counter.close()
        engine.seconds["search"] = engine.seconds.get("search", 0.0) + time.perf_counter() - started


def finish(engine: Engine, study: optuna.Study, test: ImageSplit | None = None,
           ptq: PtqConfig | None = None) -> tuple[Plan, nn.Module]:
    """The best feasible plan, its finalists re-scored first, with its costs, where it came from, and
    (given `test`) full-precision and quantized accuracy on it; and the model it quantizes, reconstructed
    when `ptq` says so (then the plan holds the learned ranges, and the accuracy rounding to nearest gave)."""
    search = engine.search
    started = time.perf_counter()
    if search.finalists > 1 and not search.pareto_metric and not engine.custom_score:
        engine.objective.rescore_finalists(study, search.finalists, image_scorer(
            search.score, engine.splits.search, engine.model, search.batch_size), search.seed_margin, engine.progress)
    best = best_trial(study, reconstructed=False)
    engine.seconds["finalists"] = time.perf_counter() - started
    picking = ptq is not None and ptq.reconstruct and ptq.finalists
    if picking and len(study.user_attrs.get(FINALIST_SCORES, {})) > 1:
        best = pick_reconstructed(engine, study, ptq, best)
    else:
        if picking:
            note("[ptq] finalists: no finalists were re-scored (search finalists = 1, a Pareto study or a custom "
                 "score): the best trial is reconstructed alone", engine.progress)
        if study.user_attrs.get(RECONSTRUCTED_PICK):  # an earlier run's choice, which this run does not make
            study.set_user_attr(RECONSTRUCTED_PICK, None)
    plan = Plan.from_dict(best.user_attrs["plan"])
    plan.totals = best.user_attrs["costs"]
    plan.metadata = {"study": engine.name, "storage": engine.storage_url, "trial": best.number,
                     "seed": best.user_attrs.get("seed"), "score": "custom" if engine.custom_score else search.score,
                     "search_score": best.values[0], "finalist_score": finalist_score(study, best),
                     "budget": engine.objective.budget.limits, "cost_model": _name(search.cost_model)}
    started = time.perf_counter()
    with stage("post-training quantization of the chosen plan", engine.progress):
        quantized = post_training_quantize(engine.model, plan, engine.splits.search, search.bn_correction)
    if test is not None:
        plan.metadata.update({"fp_test_accuracy": reference_accuracy(engine.model, test, search.batch_size,
                                                                       engine.progress),
                              "test_accuracy": accuracy(quantized, test, search.batch_size, engine.progress),
                              "test_images": len(test)})
        engine.seconds["test"] = time.perf_counter() - started
    if ptq is not None and ptq.reconstruct:
        started = time.perf_counter()
        plan = reconstruct_plan(quantized, engine.model, plan, engine.splits.search, ptq, engine.progress)
        engine.seconds["reconstruction"] = time.perf_counter() - started
        if test is not None:
            plan.metadata.update({"nearest_test_accuracy": plan.metadata["test_accuracy"],
                                  "test_accuracy": accuracy(quantized, test, search.batch_size, engine.progress)})
    plan.metadata["seconds"] = engine.seconds
    outcome = {key: plan.metadata.get(key) for key in ("trial", "search_score", "finalist_score", "fp_test_accuracy",
                                                         "nearest_test_accuracy", "test_accuracy", "test_images")}
    # the uniform plans depend only on what the study's fingerprint fixes: measured once per study
    baselines = study.user_attrs.get(OUTCOME, {}).get("uniform") or uniform_baselines(engine)
    study.set_user_attr(OUTCOME, {**outcome, "uniform": baselines})
    return plan, quantized


def pick_reconstructed(engine: Engine, study: optuna.Study, ptq: PtqConfig,
                       incumbent: optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial:
    """The re-scored finalist that scores best once reconstructed, on the search images reconstruction does
    not fit on. It replaces `incumbent` (the pick rounded to nearest) only when it beats it by the seed
    margin in standard errors, as the finalists do. Kept in the study, so export, report and a resumed
    run agree without reconstructing every finalist again."""
    search, finalists = engine.search, sorted(map(int, study.user_attrs[FINALIST_SCORES]))
    decided = {"finalists": finalists, "incumbent": incumbent.number, "reconstruction": ptq.settings(),
               "seed_margin": search.seed_margin}
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    saved = study.user_attrs.get(RECONSTRUCTED_PICK) or {}
    if {k: v for k, v in saved.items() if k not in ("trial", "scores")} == decided:
        return trials[saved["trial"]]
    held_out = engine.splits.search.last(len(engine.splits.search) - ptq.images)
    if not len(held_out):
        raise UserError(f"[ptq] finalists scores the finalists on search images past the {ptq.images} reconstruction "
                        f"fits on, and the search split has {len(engine.splits.search)}: lower [ptq] images or raise "
                        f"[data] search_size")
    scorer = image_scorer(search.score, held_out, engine.model, search.batch_size)
    per_image = {}
    started = time.perf_counter()
    for number in bar(len(finalists), "reconstruct the finalists", engine.progress, iterable=finalists):
        plan = Plan.from_dict(trials[number].user_attrs["plan"])
        per_image[number] = scorer(post_training_quantize(engine.model, plan, engine.splits.search, search.bn_correction,
                                                          reconstruction=ptq, progress=False))
    engine.seconds["reconstruct finalists"] = time.perf_counter() - started
    ranked = sorted(finalists, key=lambda n: (float(per_image[n].mean()), n == incumbent.number), reverse=True)
    winner = next(n for n in ranked if n == incumbent.number or standard_errors_above(
        per_image[n], per_image[incumbent.number]) >= search.seed_margin)
    study.set_user_attr(RECONSTRUCTED_PICK, {"trial": winner, **decided, "scores": {
        str(n): float(values.mean()) for n, values in per_image.items()}})
    return trials[winner]


def uniform_baselines(engine: Engine) -> list[dict]:
    """Each searched weight bit-width as a uniform plan (the ends pinned as the search pins them): its
    costs and its score as trials are scored, the reference points a mixed plan must beat. The scores
    depend only on what the study's fingerprint fixes: read from the cache when a study like it ran
    before (unless scored by the user's callable, which the fingerprint cannot tell apart)."""
    objective, search = engine.objective, engine.search
    plans = [objective.factory.uniform(bits, search.default_activation_bits, search.first_last_bits)
             for bits in search.weight_bits]
    with stage("uniform baselines", engine.progress):
        key = {"fingerprint": engine.fingerprint, "version": 1, "quantizer": REVISION}
        scores = cached_json(engine.model.state_dict(), key, "uniform-",
                             lambda: [objective.score(plan) for plan in plans],
                             None if engine.custom_score else "default")
    return [{"weight_bits": bits, "costs": objective.cost_model.evaluate(engine.graph, plan).totals, "score": score}
            for bits, plan, score in zip(search.weight_bits, plans, scores)]


def _name(cost_model: str | CostModel) -> str:
    return cost_model if isinstance(cost_model, str) else getattr(cost_model, "name", type(cost_model).__name__)


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))
