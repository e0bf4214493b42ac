"""Multi-fidelity pruning for accuracy scored on a few images first (`screen_images`).

A median rule prunes half of any set of trials, and near a good seed most plans are within the
screening subset's noise of each other: it would discard half the local search by chance. This
pruner stops a trial only when its screening accuracy is clearly worse than the best finished
trial's at the same step: more than `z` binomial standard errors of an accuracy on that many images.
"""

from __future__ import annotations

import math

import optuna
from optuna.pruners import BasePruner
from optuna.trial import FrozenTrial, TrialState


class ScreeningPruner(BasePruner):
    """Prune at a screening step when accuracy (percent, on `images` images) < best's - z * its standard error."""

    def __init__(self, images: int, z: float = 2.0):
        if images < 1 or z < 0:
            raise ValueError(f"images must be >= 1 and z >= 0, got {images} and {z}")
        self.images, self.z = images, z

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        finished = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                    if step in t.intermediate_values]
        if not finished:
            return False
        best = max(finished, key=lambda t: t.values[0])
        reference = best.intermediate_values[step]
        fraction = min(max(reference / 100.0, 0.0), 1.0)
        standard_error = 100.0 * math.sqrt(fraction * (1.0 - fraction) / self.images)
        return trial.intermediate_values[step] < reference - self.z * standard_error
