"""Samplers for the search: TPE or random, optionally with a local search around the best plan.

Seeds start the search on good plans; plain TPE then spends many trials before it exploits them.
`NeighborhoodSampler` proposes, for a share of the trials, a neighbour of the best feasible plan
so far: one tie group a bit-width up and another one down (a move that roughly keeps the plan on
its budget), never a plan already tried (compared after `settle`, the objective's own move onto the
budget). The other trials go to the base sampler, which keeps exploring. Everything else
(constraints, startup, multi-objective) is the base sampler's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, IntDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from .errors import UserError
from .registry import Registry

EVALUATED_PARAMS = "evaluated_params"  # trial attribute: the parameters of the plan evaluated (after repair)
Incumbent = Callable[[optuna.Study], "Mapping[str, int] | None"]  # the best feasible plan's parameters, if any
Settle = Callable[[Mapping[str, int]], Mapping[str, int]]  # sampled parameters -> those the objective evaluates
_ATTEMPTS = 50  # random moves tried before giving the trial to the base sampler (all neighbours seen)


class NeighborhoodSampler(BaseSampler):
    """`local_share` of the trials: an untried neighbour of `incumbent(study)`; the rest: `base`."""

    def __init__(self, base: BaseSampler, incumbent: Incumbent, local_share: float = 0.5, seed: int | None = None,
                 settle: Settle = dict):
        if not 0.0 <= local_share <= 1.0:
            raise ValueError(f"local_share must be in [0, 1], got {local_share}")
        self.base, self.incumbent, self.local_share, self.settle = base, incumbent, local_share, settle
        self._rng = np.random.default_rng(seed)
        self._pending: tuple[dict[str, int], dict[str, BaseDistribution]] | None = None

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        """Decides the trial's kind: a neighbour's parameters are all relative, so Optuna uses them."""
        self._pending = self._neighbour(study) if self._rng.random() < self.local_share else None
        if self._pending is not None:
            return self._pending[1]
        return self.base.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if self._pending is not None:
            params, self._pending = self._pending[0], None
            return params
        return self.base.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: list[float] | None) -> None:
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()
        self._rng = np.random.default_rng()

    def _neighbour(self, study: optuna.Study) -> tuple[dict[str, int], dict[str, BaseDistribution]] | None:
        """One group up a step and another down a step from the incumbent, untried, with the
        parameters' distributions; None if there is no incumbent or no untried move was found."""
        centre = self.incumbent(study)
        trials = study.get_trials(deepcopy=False)
        finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        if centre is None or not finished:
            return None
        distributions = {name: finished[-1].distributions.get(name) for name in centre}
        if not all(isinstance(d, IntDistribution) for d in distributions.values()):
            return None
        tried = {tuple(sorted(params.items())) for t in trials
                 for params in (t.params, t.user_attrs.get(EVALUATED_PARAMS, {})) if params}
        names = list(centre)
        for _ in range(_ATTEMPTS):
            up, down = self._rng.choice(len(names), size=2, replace=False) if len(names) > 1 else (0, None)
            move = dict(centre)
            move[names[up]] += 1
            if down is not None:
                move[names[down]] -= 1
            if all(distributions[n].low <= v <= distributions[n].high for n, v in move.items()) \
                    and tuple(sorted(self.settle(move).items())) not in tried:
                return move, distributions
        return None


# (seed, multi_objective) -> an Optuna sampler; "module:function" names one of the user's
SAMPLERS = Registry("sampler", group="oaq_search.samplers")
SAMPLERS.register("tpe")(lambda seed, multi_objective: optuna.samplers.TPESampler(seed=seed,
                                                                                  multivariate=not multi_objective))
SAMPLERS.register("random")(lambda seed, multi_objective: optuna.samplers.RandomSampler(seed=seed))


def make_sampler(kind: str, seed: int, multi_objective: bool = False, local_share: float = 0.0,
                 incumbent: Incumbent | None = None, settle: Settle = dict) -> BaseSampler:
    """The sampler `kind` names (TPE reads budget violations from each trial's constraints; random is
    the baseline); with `local_share` > 0 and an `incumbent`, that share of trials searches around the
    best plan (never for random search: a baseline stays unsteered)."""
    base = SAMPLERS.get(kind)(seed, multi_objective)
    if not isinstance(base, BaseSampler):
        raise UserError(f"sampler {kind!r} made a {type(base).__name__}, not an optuna sampler")
    if local_share > 0 and incumbent is not None and not multi_objective and \
            not isinstance(base, optuna.samplers.RandomSampler):
        return NeighborhoodSampler(base, incumbent, local_share, seed, settle)
    return base
