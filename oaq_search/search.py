"""The search: Optuna over per-group weight bits, plans repaired onto the budget, scored on data.

Pieces, each small: `SearchSpace` maps tie groups to Optuna parameters; `Objective` scores one
trial (cost first, then accuracy, cached by plan key); `search` runs a study that resumes from its
storage. Bits become full OAQ plans through `planning.PlanFactory`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import optuna
from torch import nn

from hwmodels.base import CostModel, CostReport

from .budget import format_quantity
from .data import ImageSplit
from .errors import UserError
from .evaluate import accuracy
from .bn_correction import BatchNormCorrector
from .fake_quant import quantize_
from .graph import LayerGraph
from .plan import Plan
from .planning import PlanFactory


@dataclass
class SearchSpace:
    """One ordinal weight-bits parameter per tie group; pinned layers are not searched."""

    groups: list[list[str]]
    candidate_bits: list[int]
    pinned: dict[str, int]

    @classmethod
    def from_graph(cls, graph: LayerGraph, candidate_bits: list[int], first_last_bits: int | None) -> "SearchSpace":
        pinned = {}
        if first_last_bits is not None:
            pinned = {graph.names[0]: first_last_bits, graph.names[-1]: first_last_bits}
        groups = [[n for n in group if n not in pinned] for group in graph.tie_groups()]
        return cls([g for g in groups if g], sorted(set(candidate_bits)), pinned)

    @property
    def parameter_names(self) -> list[str]:
        return [f"weight_bits/{group[0]}" for group in self.groups]

    def tie_group_of(self) -> dict[str, int]:
        return {name: index for index, group in enumerate(self.groups) for name in group}

    def suggest(self, trial: optuna.Trial) -> dict[str, int]:
        """Per-layer bits from the trial: an index into the sorted candidates keeps bits ordinal."""
        bits = dict(self.pinned)
        for name, group in zip(self.parameter_names, self.groups):
            choice = self.candidate_bits[trial.suggest_int(name, 0, len(self.candidate_bits) - 1)]
            bits.update({layer: choice for layer in group})
        return bits

    def params_for(self, layer_bits: Mapping[str, int]) -> dict[str, int]:
        """The trial parameters that reproduce `layer_bits` (for enqueuing seeds)."""
        return {name: self.candidate_bits.index(layer_bits[group[0]])
                for name, group in zip(self.parameter_names, self.groups)}

    def uniform(self, bits: int) -> dict[str, int]:
        return {**{layer: bits for group in self.groups for layer in group}, **self.pinned}


def violations(report: CostReport, budget: Mapping[str, float]) -> list[float]:
    """Per budget, how far over it the plan is as a fraction of the limit (<= 0 means it fits)."""
    missing = [metric for metric in budget if metric not in report.totals]
    if missing:
        raise UserError(f"the cost model reports no {missing[0]!r}: choose a cost model that does, or drop that budget")
    return [report.totals[metric] / limit - 1.0 for metric, limit in budget.items()]


class Objective:
    """Scores one trial: repair the sampled bits onto the budget, then accuracy on the search split."""

    def __init__(self, quantized_model: nn.Module, graph: LayerGraph, space: SearchSpace, factory: PlanFactory,
                 cost_model: CostModel, budget: Mapping[str, float], eval_split: ImageSplit, batch_size: int,
                 corrector: BatchNormCorrector | None = None):
        self.model, self.graph, self.space, self.factory = quantized_model, graph, space, factory
        self.cost_model, self.budget = cost_model, dict(budget)
        self.eval_split, self.batch_size, self.corrector = eval_split, batch_size, corrector
        self.cache: dict[str, float] = {}

    def plan_and_cost(self, layer_bits: Mapping[str, int]) -> tuple[Plan, CostReport]:
        plan = self.factory(layer_bits, self.space.tie_group_of())
        return plan, self.cost_model.evaluate(self.graph, plan)

    def repair(self, layer_bits: dict[str, int]) -> dict[str, int]:
        """Lower bits, largest group first, until every budget holds (or nothing can go lower)."""
        bits = dict(layer_bits)
        size = {index: sum(self.graph.info(n).weight_count for n in group) for index, group in enumerate(self.space.groups)}
        while max(violations(self.plan_and_cost(bits)[1], self.budget), default=0) > 0:
            lowerable = [i for i, group in enumerate(self.space.groups) if bits[group[0]] > self.space.candidate_bits[0]]
            if not lowerable:
                break
            index = max(lowerable, key=lambda i: size[i] * bits[self.space.groups[i][0]])
            lower = max(b for b in self.space.candidate_bits if b < bits[self.space.groups[index][0]])
            bits.update({layer: lower for layer in self.space.groups[index]})
        return bits

    def __call__(self, trial: optuna.Trial) -> float:
        layer_bits = self.repair(self.space.suggest(trial))
        plan, report = self.plan_and_cost(layer_bits)
        trial.set_user_attr("plan_key", plan.key())
        trial.set_user_attr("weight_bits", [layer_bits[name] for name in self.graph.names])
        trial.set_user_attr("costs", report.totals)
        for metric, over in zip(self.budget, violations(report, self.budget)):
            trial.set_constraint(metric, over)  # TPE models feasibility from these
        if plan.key() not in self.cache:
            quantize_(self.model, plan)
            if self.corrector is not None:
                self.corrector.apply(self.model)
            self.cache[plan.key()] = accuracy(self.model, self.eval_split, self.batch_size)
        return self.cache[plan.key()]

    def remember(self, study: optuna.Study) -> None:
        """Seed the cache from finished trials, so a resumed study never re-evaluates a plan."""
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if "plan_key" in trial.user_attrs:
                self.cache[trial.user_attrs["plan_key"]] = trial.value


def best_fitting_uniform(objective: Objective) -> dict[str, int] | None:
    """The highest uniform bit-width (pinned layers aside) whose plan fits the budget."""
    for bits in sorted(objective.space.candidate_bits, reverse=True):
        layer_bits = objective.space.uniform(bits)
        if max(violations(objective.plan_and_cost(layer_bits)[1], objective.budget), default=0) <= 0:
            return layer_bits
    return None


def check_feasible(objective: Objective) -> None:
    """Stop before searching when even the smallest plan breaks the budget, saying what is reachable."""
    smallest = objective.space.uniform(objective.space.candidate_bits[0])
    _, report = objective.plan_and_cost(smallest)
    for (metric, limit), over in zip(objective.budget.items(), violations(report, objective.budget)):
        if over > 0:
            raise UserError(
                f"budget {metric} <= {format_quantity(metric, limit)} is infeasible: the smallest plan in the search "
                f"space needs {format_quantity(metric, report.totals[metric])} (raise the budget or allow fewer bits)"
            )


def search(objective: Objective, study: optuna.Study, n_trials: int,
           callbacks: list[Callable] | None = None) -> optuna.Study:
    """Run until the study holds `n_trials` finished trials, seeding a fresh study with a uniform plan."""
    check_feasible(objective)
    objective.remember(study)
    if not study.trials:
        seed = best_fitting_uniform(objective)
        if seed is not None:
            study.enqueue_trial(objective.space.params_for(seed), user_attrs={"seed": "uniform"})
    finished = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED
    stop = optuna.study.MaxTrialsCallback(n_trials, states=finished)
    if len(study.get_trials(deepcopy=False, states=finished)) < n_trials:
        study.optimize(objective, n_trials=n_trials, callbacks=[stop, *(callbacks or [])])
    return study


def make_sampler(seed: int) -> optuna.samplers.BaseSampler:
    """TPE, seeded; it reads budget violations from each trial's constraints."""
    return optuna.samplers.TPESampler(seed=seed)


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The most accurate finished trial whose plan fits every budget."""
    feasible = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if all(value <= 0 for value in t.constraints.values())]
    if not feasible:
        raise UserError(f"study {study.study_name} has no finished trial that fits the budget yet: run more trials")
    return max(feasible, key=lambda t: (t.value, -t.number))
