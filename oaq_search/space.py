"""The search space: per tie group, the settings it may take, and one ordinal Optuna parameter each.

A group's settings are its candidate weight bit-widths, times the grids (`search.grid` as a list)
and the input bit-widths (`search.activation_bits` as a list) when those are searched too, minus
what the target cannot run. Once every setting's cost and measured sensitivity are known,
`without_dominated` keeps, per group, only the settings no other setting beats on sensitivity and
every cost, in ascending cost: then each step along a group's list buys less damage for more
budget, which is what the seeds, the repair and the local search walk along. When only weight bits
vary, a group's list is its bit-widths, ascending, and nothing is dropped.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import optuna

from hwmodels.base import CostModel

from .errors import UserError
from .graph import LayerGraph
from .planning import Setting, end_layers
from .seeds import AllocationProblem
from .sensitivity import SensitivityTable


@dataclass
class SearchSpace:
    """One ordinal parameter per tie group over that group's settings (ascending cost); pinned layers fixed."""

    groups: list[list[str]]
    settings: list[list[Setting]]  # per group, ascending cost
    pinned: dict[str, int]  # weight bits of the pinned first and last layers
    kind: str = "weight_bits"  # what a group's parameter picks: "weight_bits", or "setting" (grids or inputs searched)

    @classmethod
    def from_graph(cls, graph: LayerGraph, candidate_bits: Sequence[int], first_last_bits: int | None,
                   sensitivity: SensitivityTable | None = None, metric: str = "", method: str = "oaq",
                   prune_above: float | None = None, cost_model: CostModel | None = None,
                   grids: Sequence[str] = ("uniform",), activation_bits: Sequence[int] | None = None) -> "SearchSpace":
        """Tie groups of `graph`, each with the settings its target runs; a weight bit-width is dropped
        when the group's sensitivity exceeds `prune_above`. `activation_bits` None: inputs not searched."""
        pinned = {name: first_last_bits for name in end_layers(graph, first_last_bits)}
        groups = [g for g in ([n for n in group if n not in pinned] for group in graph.tie_groups()) if g]
        bits = sorted(set(candidate_bits))
        per_group = []
        for group in groups:
            legal = _legal(bits, group, graph, cost_model, "weight_bits")
            weights = legal
            if prune_above is not None and sensitivity is not None:
                weights = [b for b in legal if max(sensitivity.score(metric, method, n, b) for n in group) <= prune_above]
                weights = weights or legal[-1:]  # never empty: the widest stays
            inputs = [None] if activation_bits is None else \
                _legal(sorted(set(activation_bits)), group, graph, cost_model, "activation_bits")
            options = [None] if len(grids) == 1 else list(grids)  # one grid: the factory's default
            per_group.append([Setting(w, grid, a) for w, a, grid in itertools.product(weights, inputs, options)])
        return cls(groups, per_group, pinned, "weight_bits" if len(grids) == 1 and activation_bits is None else "setting")

    @property
    def weight_bits_only(self) -> bool:
        """Whether the settings differ in weight bits alone (no grid or input bits searched)."""
        return self.kind == "weight_bits"

    @property
    def parameter_names(self) -> list[str]:
        return [f"{self.kind}/{group[0]}" for group in self.groups]

    def layer_settings(self, choice: Sequence[int]) -> dict[str, Setting]:
        """Per-layer settings from one index per group; pinned layers at their bits, the rest default."""
        return self.layer_settings_of([settings[index] for settings, index in zip(self.settings, choice)])

    def layer_settings_of(self, group_settings: Sequence[Setting]) -> dict[str, Setting]:
        """Per-layer settings from one setting per group; pinned layers at their bits."""
        chosen = {name: Setting(bits) for name, bits in self.pinned.items()}
        for group, setting in zip(self.groups, group_settings):
            chosen.update({layer: setting for layer in group})
        return chosen

    def layer_bits(self, choice: Sequence[int]) -> dict[str, int]:
        """Per-layer weight bits from one index per group."""
        return {name: setting.weight_bits for name, setting in self.layer_settings(choice).items()}

    def suggest(self, trial: optuna.Trial) -> list[int]:
        """An index per group; indices into the ascending settings keep them ordinal."""
        return [trial.suggest_int(name, 0, len(settings) - 1)
                for name, settings in zip(self.parameter_names, self.settings)]

    def params(self, choice: Sequence[int]) -> dict[str, int]:
        return dict(zip(self.parameter_names, choice))

    def tie_group_of(self) -> dict[str, int]:
        return {name: index for index, group in enumerate(self.groups) for name in group}

    def describe(self) -> list[list]:
        """The settings per group as plain data, for fingerprints and cache keys (bit-widths alone when
        only they vary, as studies and caches made before grids and input bits were searched)."""
        if self.weight_bits_only:
            return [[s.weight_bits for s in group] for group in self.settings]
        return [[[s.weight_bits, s.grid, s.activation_bits] for s in group] for group in self.settings]

    def without_dominated(self, problem: AllocationProblem) -> tuple["SearchSpace", AllocationProblem]:
        """Per group, the settings no other one beats on sensitivity and every cost of `problem`, by
        ascending budget share; the space and problem unchanged when there is no cost to compare, or when
        a budget is on a whole-plan metric (peak activation memory), which no per-group cost shows."""
        if self.weight_bits_only or not problem.costs or problem.whole_plan_budget:
            return self, problem
        keep = [_undominated(problem, group) for group in range(len(self.groups))]
        widest = max(len(k) for k in keep)

        def taken(table: np.ndarray) -> np.ndarray:
            return np.array([[table[g][k[i]] if i < len(k) else np.inf for i in range(widest)] for g, k in enumerate(keep)])

        settings = [[self.settings[g][k] for k in kept] for g, kept in enumerate(keep)]
        pruned = replace(problem, candidates=settings, sensitivity=taken(problem.sensitivity),
                         costs={m: taken(table) for m, table in problem.costs.items()})
        return SearchSpace(self.groups, settings, self.pinned, self.kind), pruned


def _legal(bits: list[int], group: list[str], graph: LayerGraph, cost_model: CostModel | None, kind: str) -> list[int]:
    """The bit-widths in `bits` that the target runs for every layer of `group` (weights or inputs)."""
    keep = bits
    if cost_model is not None:
        for name in group:
            legal = cost_model.legal_bits(graph.info(name).op_type, kind)
            keep = [b for b in keep if legal is None or b in legal]
    if not keep:
        allowed = cost_model.legal_bits(graph.info(group[0]).op_type, kind)
        raise UserError(f"none of {kind} {bits} runs on cost model {cost_model.name} for layer {group[0]}: "
                        f"allowed {allowed}")
    return keep


def _undominated(problem: AllocationProblem, group: int) -> list[int]:
    """Indices of `group`'s settings that no other setting matches or beats on sensitivity and every
    cost (the first of equals stays), sorted by their share of the budget (or of the widest's cost)."""
    count = len(problem.candidates[group])
    metrics = list(problem.costs)
    point = lambda k: [problem.sensitivity[group][k]] + [problem.costs[m][group][k] for m in metrics]  # noqa: E731
    points = [point(k) for k in range(count)]

    def beaten(k: int) -> bool:
        return any(all(a <= b for a, b in zip(points[j], points[k])) and (points[j] != points[k] or j < k)
                   for j in range(count) if j != k)

    scale = {m: problem.budget.get(m) or max(problem.costs[m][group][:count].max(), 1e-12) for m in metrics}
    kept = [k for k in range(count) if not beaten(k)]
    return sorted(kept, key=lambda k: sum(problem.costs[m][group][k] / scale[m] for m in metrics))
