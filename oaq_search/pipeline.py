"""One call per user task: run a study file end to end, join it as a worker, export its plans.

The CLI is a thin layer over these functions. `prepare` builds everything a study needs from its
config (model, data, graph, sensitivity, search space, seeds, objective); `run_study` creates or
resumes the study, works through its trial queue and reports the best plan on the test split.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
from torch import nn
from tqdm.auto import tqdm

import hwmodels

from .bn_correction import BatchNormCorrector
from .budget import parse_budget
from .checkpoints import load_checkpoint
from .config import FinetuneConfig, StudyConfig
from .data import CifarSplits, ImageSplit, load_cifar10
from .errors import UserError
from .evaluate import accuracy, image_scorer, split_scorer
from .finetune import FinetuneResult, finetune
from .graph import LayerGraph, build_layer_graph
from .models import build_model, model_spec
from .plan import Plan
from .planning import PlanFactory, uniform_activation_bits
from .ptq import CALIBRATION_IMAGES, post_training_quantize, requantize
from .pruning import ScreeningPruner
from .queue import fill_queue, work
from .samplers import make_sampler
from .search import (Objective, allocation_problem, best_trial, check_feasible, finalist_score, incumbent_params,
                     pareto_trials)
from .seeds import greedy_seed, integer_program_seed, uniform_seed
from .sensitivity import SensitivityTable, compute_sensitivity
from .sensitivity.measured import cached_group_sensitivity, measure_group_sensitivity
from .space import SearchSpace
from .storage import open_storage

SEED_BUILDERS = {"integer_program": integer_program_seed, "greedy": greedy_seed, "uniform": uniform_seed}


def load_model(name: str, checkpoint: str | Path | None = None) -> nn.Module:
    """A registered model in eval mode, with `checkpoint` loaded safely when given."""
    model = build_model(name)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model.eval()


def layer_graph(name: str, model: nn.Module) -> LayerGraph:
    return build_layer_graph(model, model_spec(name).input_shape)


@dataclass
class Prepared:
    """Everything a study needs, built once from its config."""

    config: StudyConfig
    model: nn.Module
    splits: CifarSplits
    graph: LayerGraph
    space: SearchSpace
    objective: Objective
    sensitivity: SensitivityTable
    seeds: list[tuple[dict[str, int], str]]
    fingerprint: dict[str, str]
    seconds: dict[str, float] = field(default_factory=dict)


def prepare(config: StudyConfig) -> Prepared:
    """Model, data, graph, sensitivity, space, seeds and objective for `config`; checks the budget."""
    started = time.perf_counter()
    search = config.search
    model = load_model(config.model.name, config.model.checkpoint)
    splits = load_cifar10(config.data.root, config.data.search_size, config.data.download)
    graph = layer_graph(config.model.name, model)
    cost_model = hwmodels.get_cost_model(search.cost_model)
    budget = parse_budget(config.budget)
    loaded = time.perf_counter()
    sensitivity = compute_sensitivity(model, graph, [search.sensitivity_metric], methods=[search.method],
                                      grid=search.grids[0], data=splits.search)
    sensitivity_s = time.perf_counter() - loaded
    space = SearchSpace.from_graph(graph, search.weight_bits, search.first_last_bits, sensitivity,
                                   search.sensitivity_metric, search.method, search.prune_sensitivity, cost_model,
                                   search.grids, search.searched_activation_bits)
    calibration = next(splits.search.batches(CALIBRATION_IMAGES))[0]
    factory = PlanFactory(config.model.name, model, graph, search.method, search.grids[0], search.per_channel,
                          calibration if search.outlier_rule == "output_error" else None,
                          uniform_activation_bits(graph, search.default_activation_bits, search.first_last_bits),
                          cost_model.code_packing)
    problem = allocation_problem(space, factory, cost_model, graph, budget, sensitivity, search.sensitivity_metric,
                                 search.method, [search.pareto_metric] if search.pareto_metric else [])
    check_feasible(problem)
    corrector = BatchNormCorrector(model, calibration) if search.bn_correction else None
    trial_model = copy.deepcopy(model)  # wrapped and re-quantized in place by every trial
    quantizer = {"groups": space.groups, "bits": space.describe(), "pinned": space.pinned,
                 "method": search.method, "grid": search.grid, "per_channel": search.per_channel,
                 "bn_correction": search.bn_correction, "activation_bits": search.activation_bits,
                 "outlier_rule": search.outlier_rule, "measured_sensitivity_images": search.measured_sensitivity_images}
    measuring = time.perf_counter()
    if search.measured_sensitivity_images:
        def quantized(choice: list[int]) -> nn.Module:
            return requantize(trial_model, factory.from_settings(space.layer_settings(choice)), calibration, corrector)

        problem.sensitivity = _measured_sensitivity(quantized, [len(s) for s in space.settings], model, splits.search,
                                                    search.measured_sensitivity_images,
                                                    {**quantizer, "model": config.model.name})
    measured_s = time.perf_counter() - measuring
    space, problem = space.without_dominated(problem)
    scored = splits.search.subset(search.eval_images)
    scorers = [split_scorer(search.score, scored, model, search.batch_size)]
    if 0 < search.screen_images < search.eval_images:
        scorers.insert(0, split_scorer(search.score, splits.search.subset(search.screen_images), model,
                                       search.batch_size))
    objective = Objective(trial_model, graph, space, factory, cost_model, budget, problem, scorers,
                          corrector, search.pareto_metric, calibration, search.fill_budget)
    seeds = []
    for name in search.seeds:
        choice = SEED_BUILDERS[name](problem)
        if choice is not None:
            seeds.append((space.params(choice), name))
    fingerprint = {
        "model": config.model.name,
        "checkpoint": _file_digest(config.model.checkpoint) if config.model.checkpoint else "none",
        "search split": scored.fingerprint(),
        "search space": json.dumps({**quantizer, "score": search.score, "screen_images": search.screen_images,
                                    "pareto_metric": search.pareto_metric, "sampler": search.sampler,
                                    "local_search": search.local_search, "fill_budget": search.fill_budget,
                                    # the settings kept: measured on each machine, so workers must agree on them
                                    **({} if space.weight_bits_only else {"settings kept": space.describe()})},
                                   sort_keys=True),
        "cost model": cost_model.fingerprint(),
        "budget": json.dumps(budget, sort_keys=True),
    }
    seconds = {"setup": loaded - started, "sensitivity": sensitivity_s, "measured sensitivity": measured_s,
               "seeds": time.perf_counter() - loaded - sensitivity_s - measured_s}
    return Prepared(config, model, splits, graph, space, objective, sensitivity, seeds, fingerprint, seconds)


def _measured_sensitivity(quantized: Callable[[list[int]], nn.Module], counts: list[int], model: nn.Module,
                          search_split: ImageSplit, images: int, settings: dict) -> np.ndarray:
    """Per group and setting, the output KL with only that group quantized, on the search split's last
    `images` (cached on disk by `settings`, the data and the weights)."""
    probe = next(search_split.last(images).batches(images))[0]
    return cached_group_sensitivity({**settings, "search split": search_split.fingerprint()}, model,
                                    lambda: measure_group_sensitivity(quantized, counts, model, probe))


def open_study(prepared: Prepared, create: bool, worker_index: int = 0) -> tuple[optuna.Study, optuna.storages.BaseStorage]:
    """Create the study (`create`) or join it, after checking nothing it depends on has changed."""
    config = prepared.config
    storage = open_storage(config.storage_url, config.search.heartbeat_seconds, config.search.grace_seconds)
    directions = ["maximize", "minimize"] if config.search.pareto_metric else ["maximize"]
    try:
        study = optuna.load_study(study_name=config.name, storage=storage)
    except KeyError:
        if not create:
            raise UserError(f"study {config.name!r} does not exist in {config.storage_url}: create it first with "
                            f"`oaq-search create` (workers must not race to create it)") from None
        study = optuna.create_study(study_name=config.name, storage=storage, directions=directions)
        study.set_user_attr("fingerprint", prepared.fingerprint)
    stored = study.user_attrs.get("fingerprint", {})
    changed = [part for part in prepared.fingerprint if stored.get(part) != prepared.fingerprint[part]]
    if changed:
        raise UserError(f"study {config.name!r} in {config.storage_url} was started with a different "
                        f"{', '.join(changed)}: use a new study name or the original settings")
    # Offset the sampler seed by the trials already stored and by worker, so no run replays another's samples.
    study.sampler = make_sampler(config.search.sampler,
                                 config.search.seed + len(study.get_trials(deepcopy=False)) + 1000 * worker_index,
                                 bool(config.search.pareto_metric), config.search.local_search, incumbent_params,
                                 prepared.objective.settle_params)
    screen_images = config.search.screen_images  # the pruner is only asked when a screening scorer runs
    study.pruner = ScreeningPruner(screen_images) if screen_images else optuna.pruners.NopPruner()
    if create:
        fill_queue(study, config.search.n_trials, prepared.seeds)
    prepared.objective.remember(study)
    return study, storage


@dataclass
class StudyResult:
    """What `run_study` produced: the best plan, its accuracies, and where things were written."""

    plan: Plan
    plan_path: Path
    study_name: str
    storage_url: str
    search_score: float  # the best trial's, by config.search.score
    fp_test_accuracy: float
    test_accuracy: float
    finished_trials: int
    parameters: int
    seconds: dict[str, float] = field(default_factory=dict)
    finetuned: FinetuneResult | None = None  # when the study file has a [finetune] section


def run_study(config: StudyConfig, progress: bool | None = None) -> StudyResult:
    """Create or resume the study, run its queue, write the best plan, report test accuracy."""
    prepared = prepare(config)
    study, storage = open_study(prepared, create=True)
    started = time.perf_counter()
    _work_with_progress(study, storage, prepared, progress)
    prepared.seconds["search"] = time.perf_counter() - started
    result = finish(prepared, study)
    if config.finetune.mode != "none":
        # One folder per plan: re-running resumes the same plan's fine-tune; a new best plan starts afresh.
        folder = config.output_path / "finetune" / result.plan.key()
        result.finetuned = finetune_and_test(prepared.model, result.plan, prepared.splits, config.finetune, folder,
                                             config.data.test_images, progress)
        result.seconds["finetune"] = result.finetuned.seconds
    return result


def finetune_and_test(model: nn.Module, plan: Plan, splits: CifarSplits, config: FinetuneConfig,
                      output_dir: str | Path, test_images: int | None = None,
                      progress: bool | None = None) -> FinetuneResult:
    """Fine-tune `plan`, then score full precision, post-training and fine-tuned on the test split.

    The three accuracies go into the result's `scores` and the fine-tuned plan's metadata."""
    result = finetune(model, plan, splits, config, output_dir, progress)
    test_split = splits.test.subset(test_images or len(splits.test))
    result.scores = {"fp_test_accuracy": accuracy(model, test_split),
                     "ptq_test_accuracy": accuracy(post_training_quantize(model, plan, splits.search), test_split),
                     "test_accuracy": accuracy(result.model, test_split), "test_images": len(test_split)}
    result.plan.metadata["finetune"].update(result.scores)
    result.plan.save(result.files["plan"])
    return result


def run_worker(config: StudyConfig, worker_index: int, progress: bool | None = None) -> int:
    """Join an existing study and run waiting trials until the queue is empty; returns trials run."""
    prepared = prepare(config)
    study, storage = open_study(prepared, create=False, worker_index=worker_index)
    return _work_with_progress(study, storage, prepared, progress)


def create_study(config: StudyConfig) -> int:
    """Create the study and enqueue its trials (seeds first) without running any; returns the queue size."""
    prepared = prepare(config)
    study, _ = open_study(prepared, create=True)
    return len(study.get_trials(deepcopy=False))


def _work_with_progress(study, storage, prepared: Prepared, progress: bool | None) -> int:
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    bar = tqdm(total=prepared.config.search.n_trials, desc="search", disable=None if progress is None else not progress,
               initial=len(study.get_trials(deepcopy=False, states=finished)))
    grace = prepared.config.search.grace_seconds

    def waiting(numbers: list[int]) -> None:
        tqdm.write(f"search: waiting on trial(s) {', '.join(map(str, numbers))} running in other workers; a worker "
                   f"silent for {grace} s has its trial retried here")

    try:
        return work(study, storage, prepared.objective, on_finished=lambda _trial: bar.update(1), on_waiting=waiting)
    finally:
        bar.close()


def finish(prepared: Prepared, study: optuna.Study) -> StudyResult:
    """The best feasible plan, re-applied with calibration, scored once on the test split, written out."""
    config = prepared.config
    started = time.perf_counter()
    if config.search.finalists > 1 and not config.search.pareto_metric:
        prepared.objective.rescore_finalists(study, config.search.finalists, image_scorer(
            config.search.score, prepared.splits.search, prepared.model, config.search.batch_size),
            config.search.seed_margin)
    best = best_trial(study)
    plan = Plan.from_dict(best.user_attrs["plan"])
    prepared.seconds["finalists"] = time.perf_counter() - started
    started = time.perf_counter()
    test_split = prepared.splits.test.subset(config.data.test_images or len(prepared.splits.test))
    fp_test = accuracy(prepared.model, test_split, config.search.batch_size)
    quantized = post_training_quantize(prepared.model, plan, prepared.splits.search, config.search.bn_correction)
    test = accuracy(quantized, test_split, config.search.batch_size)
    prepared.seconds["test"] = time.perf_counter() - started
    plan.totals = best.user_attrs["costs"]
    plan.metadata = {"study": config.name, "storage": config.storage_url, "trial": best.number,
                     "checkpoint": config.model.checkpoint,
                     "seed": best.user_attrs.get("seed"), "score": config.search.score, "search_score": best.values[0],
                     "finalist_score": finalist_score(study, best),
                     "fp_test_accuracy": fp_test, "test_accuracy": test, "test_images": len(test_split),
                     "budget": parse_budget(config.budget), "cost_model": config.search.cost_model,
                     "seconds": prepared.seconds}
    plan_path = plan.save(config.output_path / "plan.json")
    finished = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                             optuna.trial.TrialState.PRUNED)))
    return StudyResult(plan, plan_path, config.name, config.storage_url, best.values[0], fp_test, test, finished,
                       len(prepared.space.parameter_names), prepared.seconds)


def export_plans(config: StudyConfig, trial_number: int | None = None, pareto: bool = False) -> list[Plan]:
    """Plans stored in a study: its best feasible trial, a given trial, or the whole Pareto front."""
    storage = open_storage(config.storage_url, config.search.heartbeat_seconds, config.search.grace_seconds)
    try:
        study = optuna.load_study(study_name=config.name, storage=storage)
    except KeyError:
        raise UserError(f"study {config.name!r} does not exist in {config.storage_url}") from None
    if pareto:
        trials = pareto_trials(study)
    elif trial_number is not None:
        trials = [t for t in study.get_trials(deepcopy=False) if t.number == trial_number]
        if not trials or trials[0].state != optuna.trial.TrialState.COMPLETE:
            raise UserError(f"study {config.name!r} has no finished trial number {trial_number}")
    else:
        trials = [best_trial(study)]
    plans = []
    for trial in trials:
        plan = Plan.from_dict(trial.user_attrs["plan"])
        plan.totals = trial.user_attrs["costs"]
        plan.metadata = {"study": config.name, "trial": trial.number, "score": config.search.score,
                         "search_score": trial.values[0]}
        plans.append(plan)
    return plans


def _file_digest(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
