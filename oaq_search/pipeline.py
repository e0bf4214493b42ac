"""One call per user task: load a model, run a study file end to end, quantize uniformly (PTQ).

The CLI is a thin layer over these functions; Python users with their own model and data call
`search` and the pieces in `oaq_search.search` directly.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch
from torch import nn
from tqdm.auto import tqdm

import hwmodels

from .budget import parse_budget
from .checkpoints import load_checkpoint
from .config import StudyConfig
from .data import CifarSplits, load_cifar10
from .errors import UserError
from .evaluate import accuracy
from .graph import LayerGraph, build_layer_graph
from .models import build_model, model_spec
from .bn_correction import BatchNormCorrector
from .plan import Plan
from .planning import PlanFactory
from .ptq import CALIBRATION_IMAGES, post_training_quantize
from .search import Objective, SearchSpace, best_trial, make_sampler, search
from .storage import open_storage


def load_model(name: str, checkpoint: str | Path | None = None) -> nn.Module:
    """A registered model in eval mode, with `checkpoint` loaded safely when given."""
    model = build_model(name)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model.eval()


def layer_graph(name: str, model: nn.Module) -> LayerGraph:
    return build_layer_graph(model, model_spec(name).input_shape)


@dataclass
class StudyResult:
    """What `run_study` produced: the best plan, its accuracies, and where things were written."""

    plan: Plan
    plan_path: Path
    study_name: str
    storage_url: str
    search_accuracy: float
    fp_test_accuracy: float
    test_accuracy: float
    finished_trials: int
    timings_s: dict[str, float] = field(default_factory=dict)


def study_fingerprint(config: StudyConfig, splits: CifarSplits, space: SearchSpace, cost_model: hwmodels.CostModel) -> dict[str, str]:
    """What a resumed study must share with the one that started it, part by part."""
    checkpoint = config.model.checkpoint
    return {
        "model": config.model.name,
        "checkpoint": _file_digest(checkpoint) if checkpoint else "none",
        "search split": splits.search.subset(config.search.eval_images).fingerprint(),
        "search space": json.dumps({"groups": space.groups, "bits": space.candidate_bits, "pinned": space.pinned,
                                    "method": config.search.method, "grid": config.search.grid,
                                    "per_channel": config.search.per_channel,
                                    "bn_correction": config.search.bn_correction}, sort_keys=True),
        "cost model": cost_model.fingerprint(),
        "budget": json.dumps(parse_budget(config.budget), sort_keys=True),
    }


def open_study(config: StudyConfig, fingerprint: dict[str, str]) -> optuna.Study:
    """Create the study, or resume it after checking that nothing it depends on has changed."""
    storage = open_storage(config.storage_url)
    study = optuna.create_study(study_name=config.name, storage=storage, direction="maximize", load_if_exists=True)
    # Offset the seed by the trials already stored, so a resumed run does not replay earlier samples.
    study.sampler = make_sampler(config.search.seed + len(study.get_trials(deepcopy=False)))
    stored = study.user_attrs.get("fingerprint")
    if stored is None:
        study.set_user_attr("fingerprint", fingerprint)
    else:
        changed = [part for part in fingerprint if stored.get(part) != fingerprint[part]]
        if changed:
            raise UserError(f"study {config.name!r} in {config.storage_url} was started with a different "
                            f"{', '.join(changed)}: use a new study name or the original settings")
    return study


def run_study(config: StudyConfig, progress: bool | None = None) -> StudyResult:
    """Load model and data, search under the budget, write the best plan, report test accuracy."""
    timings = {}
    started = time.perf_counter()
    model = load_model(config.model.name, config.model.checkpoint)
    splits = load_cifar10(config.data.root, config.data.search_size, config.data.download)
    graph = layer_graph(config.model.name, model)
    cost_model = hwmodels.get_cost_model(config.search.cost_model)
    space = SearchSpace.from_graph(graph, config.search.weight_bits, config.search.first_last_bits)
    factory = PlanFactory(config.model.name, model, graph, config.search.method, config.search.grid,
                          config.search.per_channel)
    budget = parse_budget(config.budget)
    corrector = None
    if config.search.bn_correction:
        corrector = BatchNormCorrector(model, next(splits.search.batches(CALIBRATION_IMAGES))[0])
    objective = Objective(copy.deepcopy(model), graph, space, factory, cost_model, budget,
                          splits.search.subset(config.search.eval_images), config.search.batch_size, corrector)
    study = open_study(config, study_fingerprint(config, splits, space, cost_model))
    timings["setup"] = time.perf_counter() - started

    started = time.perf_counter()
    bar = tqdm(total=config.search.n_trials, desc="search", disable=None if progress is None else not progress)
    bar.update(len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))))
    search(objective, study, config.search.n_trials, callbacks=[lambda _study, _trial: bar.update(1)])
    bar.close()
    timings["search"] = time.perf_counter() - started

    best = best_trial(study)
    layer_bits = dict(zip(graph.names, best.user_attrs["weight_bits"]))
    plan, report = objective.plan_and_cost(layer_bits)
    started = time.perf_counter()
    test_split = splits.test.subset(config.data.test_images or len(splits.test))
    fp_test = accuracy(model, test_split, config.search.batch_size)
    quantized = post_training_quantize(model, plan, splits.search, config.search.bn_correction)
    test = accuracy(quantized, test_split, config.search.batch_size)
    timings["test"] = time.perf_counter() - started
    plan.totals = report.totals
    plan.metadata = {"study": config.name, "storage": config.storage_url, "trial": best.number,
                     "search_accuracy": best.value, "fp_test_accuracy": fp_test, "test_accuracy": test,
                     "budget": parse_budget(config.budget), "cost_model": cost_model.name}
    plan = plan.with_layers({name: {"cost": costs} for name, costs in report.per_layer.items()})
    plan_path = plan.save(config.output_path / "plan.json")
    finished = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    return StudyResult(plan, plan_path, config.name, config.storage_url, best.value, fp_test, test, finished, timings)


def _file_digest(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
