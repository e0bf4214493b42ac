"""One registry per component kind: built-in names, `module:attribute` the user names, type checks."""

from __future__ import annotations

import pytest

import hwmodels
from oaq_search.config import SearchConfig
from oaq_search.errors import UserError
from oaq_search.pipeline import run_study
from oaq_search.registry import Registry
from oaq_search.sensitivity import METRICS, SensitivityMetric

from test_search import synthetic_study

USER_MODULE = '''
from hwmodels import MemoryModel


def all_lowest(problem):
    """A seed of the user's: every group at its cheapest setting."""
    return [0] * len(problem.candidates)


class NeedsArguments(MemoryModel):
    def __init__(self, clock_hz):
        self.clock_hz = clock_hz


NOT_A_FUNCTION = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_parts.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_parts"


def test_a_seed_named_by_module_path_is_queued_and_scored(user_module, synthetic_cifar, tmp_path):
    config = synthetic_study(synthetic_cifar, tmp_path, n_trials=2, seeds=[f"{user_module}:all_lowest"])
    config.budget = {"memory": "200KiB"}
    result = run_study(config)
    assert result.finished_trials == 2 and result.plan.metadata is not None


@pytest.mark.parametrize("settings, expected", [
    ({"sampler": "annealing"}, "unknown sampler 'annealing' for sampler: use one of tpe, random or module:attribute"),
    ({"seeds": ["lucky"]}, "unknown seed 'lucky' for seeds: use one of greedy, uniform, integer_program"),
    ({"sensitivity_metric": "vibes"}, "unknown sensitivity metric 'vibes' for sensitivity_metric: use one of ssim_distribution, ssim_weight, mse, hessian"),
])
def test_unknown_component_names_are_refused_listing_the_known_ones(settings, expected):
    with pytest.raises(UserError, match=expected):
        SearchConfig(**settings)


def test_components_named_by_module_path_are_type_checked(user_module):
    with pytest.raises(UserError, match=r"cost model 'user_parts:NeedsArguments' cannot be made without arguments"):
        hwmodels.get_cost_model(f"{user_module}:NeedsArguments")
    with pytest.raises(UserError, match="seed 'user_parts:NOT_A_FUNCTION' is a int, not a function"):
        Registry("seed").get(f"{user_module}:NOT_A_FUNCTION")
    with pytest.raises(UserError, match=r"sensitivity metric 'hwmodels:MemoryModel' is class MemoryModel, not a "
                                        r"oaq_search.sensitivity.metrics.SensitivityMetric"):
        METRICS.get("hwmodels:MemoryModel")
    assert isinstance(METRICS.get("mse"), SensitivityMetric)
    assert "bitfusion" in hwmodels.available() and "memory" in hwmodels.available()
