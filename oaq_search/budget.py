"""Budgets in the user's terms ("memory=80KiB,latency=1.2ms") mapped onto cost-model metrics."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from .errors import UserError

# Budget name -> (cost-model metric, unit table in base units of that metric).
_BYTES = {"B": 1, "KB": 1e3, "KiB": 1024, "MB": 1e6, "MiB": 1024**2, "GB": 1e9, "GiB": 1024**3}
_SECONDS = {"s": 1, "ms": 1e-3, "us": 1e-6}
_COUNT = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
BUDGETS = {
    "memory": ("weight_bytes", _BYTES),
    "activation_memory": ("peak_activation_bytes", _BYTES),
    "latency": ("latency_s", _SECONDS),
    "bops": ("bops", _COUNT),
}
_QUANTITY = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_budget(budget: str | Mapping[str, str | float] | None) -> dict[str, float]:
    """{metric: limit in base units} from "memory=98KiB,bops=2G" or {"memory": "98KiB"}."""
    if not budget:
        return {}
    if isinstance(budget, str):
        items = []
        for part in filter(None, (p.strip() for p in budget.split(","))):
            name, sep, value = part.partition("=")
            if not sep:
                raise UserError(f"budget {part!r} must look like name=value, e.g. memory=98KiB")
            items.append((name.strip(), value.strip()))
    else:
        items = list(budget.items())
    return dict(_parse_one(name, value) for name, value in items)


def _parse_one(name: str, value: str | float) -> tuple[str, float]:
    if name not in BUDGETS:
        raise UserError(f"unknown budget {name!r}: use one of {', '.join(BUDGETS)}")
    metric, units = BUDGETS[name]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        match = _QUANTITY.match(str(value))
        if not match:
            raise UserError(f"budget {name}={value!r} is not a number with a unit ({', '.join(u for u in units if u)})")
        number, unit = float(match.group(1)), match.group(2)
    if unit not in units and not (unit == "" and "B" in units):
        raise UserError(f"budget {name}={value!r}: unknown unit {unit!r}, use one of {', '.join(u for u in units if u)}")
    limit = number * units.get(unit, 1)
    if not 0 < limit < math.inf:
        raise UserError(f"budget {name}={value!r} must be a positive, finite quantity")
    return metric, limit


@dataclass(frozen=True)
class Budget:
    """The user's limits, {cost-model metric: limit in base units}: one object judges every plan, in
    seeds, repair, feasibility and trials alike, from the cost model's totals."""

    limits: dict[str, float]

    @classmethod
    def parse(cls, budget: str | Mapping[str, str | float] | None) -> "Budget":
        return cls(parse_budget(budget))

    def over(self, totals: Mapping[str, float]) -> dict[str, float]:
        """Per metric, how far over its limit `totals` are, as a fraction (<= 0: it fits)."""
        missing = [metric for metric in self.limits if metric not in totals]
        if missing:
            raise UserError(f"the cost model reports no {missing[0]!r}: choose a cost model that does, or drop that budget")
        return {metric: totals[metric] / limit - 1.0 for metric, limit in self.limits.items()}

    def split(self, additive: Sequence[str]) -> tuple[dict[str, float], dict[str, float]]:
        """The limits on metrics that add up over layers (`additive`), and on the rest (whole-plan metrics)."""
        return ({m: v for m, v in self.limits.items() if m in additive},
                {m: v for m, v in self.limits.items() if m not in additive})


def format_quantity(metric: str, value: float) -> str:
    """A metric value in readable units: bytes in KiB (under 1 KiB in B), seconds in ms, large counts with
    G/M, anything else (a plug-in's fractions, scores) as it is."""
    if metric.endswith("bytes"):
        return f"{value / 1024:.1f} KiB" if value >= 1024 else f"{value:.0f} B"
    if metric.endswith("_s"):
        return f"{value * 1e3:.3f} ms"
    if value >= 1e6:
        return f"{value / 1e9:.3f} G" if value >= 1e9 else f"{value / 1e6:.3f} M"
    return f"{value:g}"
