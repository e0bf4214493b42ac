"""Plans that already fit the budget, to start the search from: integer program, greedy, uniform.

All three read one `AllocationProblem`: per tie group and candidate setting (weight bits, and the
grid and input bits where those are searched), a sensitivity (to minimise) and a cost per budgeted
metric (additive over layers). The integer program is exact (scipy's `milp`, HiGHS); the greedy
lowers, step by step, whichever group gives the most budget per unit of sensitivity, then fills
what slack is left; the same steps move sampled plans onto the budget.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from .planning import Setting
from .registry import Registry

# problem -> a choice per group that fits, or None; "module:function" names one of the user's
SEEDS = Registry("seed", group="oaq_search.seeds")


@dataclass
class AllocationProblem:
    """sensitivity[g][k] and costs[metric][g][k] for group g at candidates[g][k]; fixed costs aside."""

    candidates: list[list[Setting]]  # per group, ascending cost
    sensitivity: np.ndarray  # (groups, widest candidate list); inf where a group has fewer candidates
    costs: dict[str, np.ndarray]  # metric -> (groups, candidates)
    fixed: dict[str, float]  # metric -> cost of everything not searched (pinned layers, other ops)
    budget: dict[str, float]  # metric -> limit, for metrics that add up over layers
    # metrics that do not add up over layers (peak activation memory): limit, and the cost model's totals
    # for one setting per group; the integer program cannot see them, repair and feasibility measure them
    whole_plan_budget: dict[str, float] = field(default_factory=dict)
    whole_plan: Callable[[list[Setting]], Mapping[str, float]] | None = None
    # whole-plan totals by choice: repair asks for the same plans again (the current one at every step)
    _measured: dict[tuple[int, ...], Mapping[str, float]] = field(default_factory=dict, init=False, repr=False,
                                                                  compare=False)

    def total(self, choice: list[int], metric: str) -> float:
        if metric in self.whole_plan_budget:
            key = tuple(choice)
            if key not in self._measured:
                self._measured[key] = self.whole_plan([self.candidates[g][k] for g, k in enumerate(choice)])
            return float(self._measured[key][metric])
        return self.fixed[metric] + float(sum(self.costs[metric][g][k] for g, k in enumerate(choice)))

    def limits(self) -> dict[str, float]:
        return {**self.budget, **self.whole_plan_budget}

    def fits(self, choice: list[int]) -> bool:
        return all(self.total(choice, metric) <= limit for metric, limit in self.limits().items())

    def lower_until_fits(self, choice: list[int]) -> list[int]:
        """Greedy repair: lower the group whose next step saves the most budget per sensitivity."""
        choice = list(choice)
        while not self.fits(choice):
            steps = {group: self._step(choice, group, index) for group, index in enumerate(choice) if index > 0}
            if not steps:
                return choice  # nothing left to lower: the caller reports infeasibility
            saving = {group: (saved, added) for group, (saved, added) in steps.items() if saved > 0}
            if saving:
                choice[max(saving, key=lambda g: saving[g][0] / max(saving[g][1], 1e-12))] -= 1
            else:  # a plateau of a whole-plan metric (a peak): no single step shrinks it, so lower where it hurts least
                choice[min(steps, key=lambda g: (steps[g][1], g))] -= 1
        return choice

    def raise_while_fits(self, choice: list[int]) -> list[int]:
        """Fill the budget's slack: raise the group whose next step removes the most sensitivity per
        budget spent, while that step still fits (a plan below budget leaves accuracy unbought)."""
        choice = list(choice)
        while True:
            steps = {group: self._step(choice, group, index + 1) for group, index in enumerate(choice)
                     if index + 1 < len(self.candidates[group])}
            steps = {group: (spent, removed) for group, (spent, removed) in steps.items()
                     if removed > 0 and self.fits(choice[:group] + [choice[group] + 1] + choice[group + 1:])}
            if not steps:
                return choice
            choice[max(steps, key=lambda g: steps[g][1] / max(steps[g][0], 1e-12))] += 1

    def _step(self, choice: list[int], group: int, index: int) -> tuple[float, float]:
        """Between candidates index - 1 and index of `group` (the other groups as in `choice`): the
        budget share (summed over metrics) and the sensitivity that separate them."""
        budget_share = sum((self.costs[m][group][index] - self.costs[m][group][index - 1]) / limit
                           for m, limit in self.budget.items())
        if self.whole_plan_budget:
            lower, upper = list(choice), list(choice)
            lower[group], upper[group] = index - 1, index
            budget_share += sum((self.total(upper, m) - self.total(lower, m)) / limit
                                for m, limit in self.whole_plan_budget.items())
        return budget_share, float(self.sensitivity[group][index - 1] - self.sensitivity[group][index])


@SEEDS.register("greedy")
def greedy_seed(problem: AllocationProblem) -> list[int] | None:
    """Every group at its widest, lowered until the plan fits, then its slack filled."""
    choice = problem.raise_while_fits(problem.lower_until_fits([len(c) - 1 for c in problem.candidates]))
    return choice if problem.fits(choice) else None


@SEEDS.register("uniform")
def uniform_seed(problem: AllocationProblem) -> list[int] | None:
    """The best plan that fits with one weight (and input) bit-width everywhere: per group the least
    sensitive setting at those bits (a group without them: its nearest below); highest bits on ties."""
    def at(bits: tuple[int, int], group: int) -> int:
        below = [k for k, s in enumerate(problem.candidates[group])
                 if all(have <= limit for have, limit in zip(_bits(s), bits))]
        if not below:
            return 0
        nearest = max(_bits(problem.candidates[group][k]) for k in below)
        return min((k for k in below if _bits(problem.candidates[group][k]) == nearest),
                   key=lambda k: problem.sensitivity[group][k])

    fitting = []
    for bits in sorted({_bits(s) for c in problem.candidates for s in c}, reverse=True):
        choice = [at(bits, group) for group in range(len(problem.candidates))]
        if problem.fits(choice):
            fitting.append(choice)
    if not fitting:
        return None
    return min(fitting, key=lambda c: sum(problem.sensitivity[g][k] for g, k in enumerate(c)))  # first of equals


def _bits(setting: Setting) -> tuple[int, int]:
    return setting.weight_bits, setting.activation_bits or 0


@SEEDS.register("integer_program")
def integer_program_seed(problem: AllocationProblem) -> list[int] | None:
    """Minimise total sensitivity subject to every budget, one setting per group (exact)."""
    groups, candidates = problem.sensitivity.shape
    missing = ~np.isfinite(problem.sensitivity)  # groups with fewer candidates: forbid the padding
    objective = np.where(missing, 0.0, problem.sensitivity).flatten()
    one_choice = np.zeros((groups, groups * candidates))
    for group in range(groups):
        one_choice[group, group * candidates:(group + 1) * candidates] = 1
    constraints = [LinearConstraint(one_choice, 1, 1)]
    for metric, limit in problem.budget.items():
        costs = np.where(missing, 0.0, problem.costs[metric]).flatten()
        constraints.append(LinearConstraint(costs[None, :], -np.inf, limit - problem.fixed[metric]))
    upper = np.where(missing, 0, 1).flatten()
    result = milp(objective, constraints=constraints, integrality=np.ones_like(objective), bounds=Bounds(0, upper))
    if not result.success:
        return None
    return [int(np.argmax(row)) for row in result.x.reshape(groups, candidates)]
