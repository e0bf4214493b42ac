"""`oaq_search.search`: the Python verb. Any `nn.Module`, any loader of (inputs, targets), a budget; a plan out.

    import oaq_search as oaq
    result = oaq.search(model, loader, budget={"memory": "60KiB"}, n_trials=6, seed=0)
    result.plan    # every Conv2d and Linear by qualified name, within the budget
    result.model   # the model quantized by it, ready to evaluate

The loader's batches become the search split (scores, calibration, sensitivity). Every option a
study file's [search] section has is a keyword here; the study lives in memory unless `storage`
names an Optuna URL, in which case the same call resumes it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import optuna
from torch import nn

from .budget import Budget
from .config import SearchConfig
from .data import Splits, split_from_batches
from .engine import Engine, build_engine, finish, finished_trials, open_study, run_trials
from .errors import UserError
from .plan import Plan
from .cache import weights_digest
from .storage import IN_MEMORY


@dataclass
class SearchResult:
    """The chosen plan, the model it quantizes, and the study behind it."""

    plan: Plan
    model: nn.Module
    study: optuna.Study
    engine: Engine

    @property
    def test_accuracy(self) -> float | None:
        """Top-1 on `test=` data in percent (None without it); `fp_test_accuracy` is full precision's."""
        return self.plan.metadata.get("test_accuracy")

    @property
    def fp_test_accuracy(self) -> float | None:
        return self.plan.metadata.get("fp_test_accuracy")


def search(model: nn.Module, loader: Iterable, *, budget: Mapping[str, str | float] | str,
           n_trials: int = 20, seed: int = 0, test: Iterable | None = None,
           score: Callable[[nn.Module], float] | None = None, storage: str | None = None,
           cost_model: str | object = "memory", name: str | None = None, leaf_modules: Iterable[str] = (),
           progress: bool | None = None, **options) -> SearchResult:
    """Find per-layer bits for `model` under `budget` on `loader`'s images, and quantize it.

    `loader` yields `(inputs, targets)` batches (a DataLoader); its first batch fixes the input shape.
    `score(quantized model) -> float`, higher is better, replaces top-1 accuracy (other tasks);
    `test` is scored once on the final plan; `storage` (an Optuna URL) makes the study resumable;
    `cost_model` is a name (`oaq-search hw list`) or a `hwmodels.CostModel`; `leaf_modules` are
    submodules torch.fx calls whole. Other keywords are [search] options of a study file."""
    if not isinstance(model, nn.Module):
        raise UserError(f"model must be a torch.nn.Module, got a {type(model).__name__}")
    settings = _search_settings(n_trials=n_trials, seed=seed, cost_model=cost_model, **options)
    search_split = split_from_batches(loader, "search")
    test_split = split_from_batches(test, "test") if test is not None else None
    splits = Splits(search_split, search_split, test_split or search_split)
    if test_split is not None and test_split.images.shape[1:] != search_split.images.shape[1:]:
        raise UserError(f"test data has inputs of shape {tuple(test_split.images.shape[1:])}, the loader "
                        f"{tuple(search_split.images.shape[1:])}: give both the same transform")
    label = name or type(model).__name__
    model.eval()
    engine = build_engine(label, storage or IN_MEMORY, model, label, splits, settings, Budget.parse(budget),
                          {"model": label, "checkpoint": weights_digest(model.state_dict())}, leaf_modules, score,
                          progress)
    study, study_storage = open_study(engine, create=True)
    run_trials(engine, study, study_storage)
    plan, quantized = finish(engine, study, test_split)
    plan.metadata["finished_trials"] = finished_trials(study)
    return SearchResult(plan, quantized, study, engine)


def _search_settings(cost_model, **options) -> SearchConfig:
    """A validated SearchConfig from keywords; a cost-model object is passed through unparsed."""
    allowed = {f.name for f in dataclasses.fields(SearchConfig)}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise UserError(f"unknown search option {unknown[0]!r}: choose from {', '.join(sorted(allowed))}")
    return SearchConfig(cost_model=cost_model, **options)
