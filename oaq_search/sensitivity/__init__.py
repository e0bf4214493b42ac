"""Per-layer sensitivity tables: layers x bit-widths x methods, for any registered metric, cached.

The table is keyed on disk by a hash of the weights and the settings, so the search and the CLI
reuse one computation. Compute times are kept per metric, since a metric's cost is part of its
value.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from ..cache import cached_json
from ..data import ImageSplit
from ..files import write_text_atomically
from ..graph import LayerGraph
from ..oaq import REVISION, WeightQuantizer, choose_outlier_settings, fake_quantize_weight
from .metrics import METRICS, SensitivityMetric, get_metric, register_metric

__all__ = ["METRICS", "SensitivityMetric", "SensitivityTable", "compute_sensitivity", "get_metric", "register_metric"]

DEFAULT_METRICS = ("ssim_weight", "ssim_distribution", "mse")
_FORMAT_VERSION = 1


@dataclass
class SensitivityTable:
    """scores[metric][method][layer index][bit index]; higher means more sensitive."""

    layers: list[str]
    bits: list[int]
    grid: str
    scores: dict[str, dict[str, list[list[float]]]]
    seconds: dict[str, float] = field(default_factory=dict)  # per metric; "quantize" for the shared part

    def score(self, metric: str, method: str, layer: str, bits: int) -> float:
        return self.scores[metric][method][self.layers.index(layer)][self.bits.index(bits)]

    def ranking(self, metric: str, method: str, bits: int) -> list[str]:
        """Layers from most to least sensitive at `bits`."""
        column = self.bits.index(bits)
        rows = self.scores[metric][method]
        return sorted(self.layers, key=lambda layer: -rows[self.layers.index(layer)][column])

    def save(self, path: str | Path) -> Path:
        return write_text_atomically(path, json.dumps(asdict(self)) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "SensitivityTable":
        return cls(**json.loads(Path(path).read_text()))

    def write_csv(self, path: str | Path) -> Path:
        path = Path(path)
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["metric", "method", "layer", *[f"{b}bit" for b in self.bits]])
            for metric, methods in self.scores.items():
                for method, rows in methods.items():
                    for layer, row in zip(self.layers, rows):
                        writer.writerow([metric, method, layer, *[f"{v:.6g}" for v in row]])
        return path

    def write_heatmap(self, path: str | Path, metric: str, method: str) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.scores[metric][method]
        figure, axis = plt.subplots(figsize=(1.2 + 0.6 * len(self.bits), 1.0 + 0.22 * len(self.layers)))
        image = axis.imshow(rows, aspect="auto", cmap="magma_r")
        axis.set_xticks(range(len(self.bits)), [f"{b}" for b in self.bits])
        axis.set_yticks(range(len(self.layers)), self.layers, fontsize=7)
        axis.set_xlabel("weight bits")
        axis.set_title(f"{metric} sensitivity ({method}, {self.grid})", fontsize=9)
        figure.colorbar(image, ax=axis, fraction=0.05)
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return Path(path)


def compute_sensitivity(model: nn.Module, graph: LayerGraph, metrics: Iterable[str | SensitivityMetric] = DEFAULT_METRICS,
                        bits: Iterable[int] = range(2, 9), methods: Iterable[str] = ("vanilla", "oaq"),
                        grid: str = "uniform", data: ImageSplit | None = None,
                        cache_dir: str | Path | None = "default") -> SensitivityTable:
    """The table for every metric, layer, bit-width and method; read from the cache when present."""
    metrics = [get_metric(m) if isinstance(m, str) else m for m in metrics]
    bits, methods = list(bits), list(methods)
    modules = dict(model.named_modules())
    weights = {name: modules[name].weight.detach() for name in graph.names}
    settings = {"metrics": [m.name for m in metrics], "bits": bits, "methods": methods, "grid": grid,
                "data": data.fingerprint() if data is not None and any(m.needs_data for m in metrics) else None,
                "version": _FORMAT_VERSION, "quantizer": REVISION}

    def measure() -> dict:
        started = time.perf_counter()
        quantized = {(layer, method, b): fake_quantize_weight(
                         weights[layer], choose_outlier_settings(weights[layer], WeightQuantizer(b, grid, method)), layer)
                     for layer in graph.names for method in methods for b in bits}
        seconds = {"quantize": time.perf_counter() - started}
        scores: dict[str, dict[str, list[list[float]]]] = {}
        for metric in metrics:
            started = time.perf_counter()
            metric.prepare(model, graph, data)
            scores[metric.name] = {method: [[metric.score(layer, weights[layer], quantized[layer, method, b])
                                             for b in bits] for layer in graph.names] for method in methods}
            seconds[metric.name] = time.perf_counter() - started
        return asdict(SensitivityTable(list(graph.names), bits, grid, scores, seconds))

    return SensitivityTable(**cached_json(weights, settings, "", measure, cache_dir))
