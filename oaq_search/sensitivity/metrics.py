"""Sensitivity metrics: how much quantizing a layer to b bits disturbs it. Higher = keep more bits.

Every metric has the same small interface: `prepare` once per model (most need nothing), then
`score(layer, weight, quantized)` per layer and bit-width. Register your own with
`@register_metric` or name it as `module:Class` on the command line.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity
from torch import nn

from ..data import ImageSplit
from ..errors import UserError
from ..graph import LayerGraph
from ..progress import bar
from ..registry import Registry

HISTOGRAM_BINS = 256
SSIM_WINDOW = 7


class SensitivityMetric(ABC):
    name: str = "abstract"
    needs_data: bool = False  # True: `prepare` must get search-split data

    def prepare(self, model: nn.Module, graph: LayerGraph, data: ImageSplit | None) -> None:
        """Per-model work shared by all layers and bit-widths (e.g. Hessian traces)."""

    @abstractmethod
    def score(self, layer: str, weight: torch.Tensor, quantized: torch.Tensor) -> float:
        """Sensitivity of `layer` when `weight` becomes `quantized`."""


METRICS = Registry("sensitivity metric", SensitivityMetric, "oaq_search.sensitivity")


def register_metric(cls: type[SensitivityMetric]) -> type[SensitivityMetric]:
    return METRICS.register(cls.name)(cls)


def get_metric(spec: str | SensitivityMetric) -> SensitivityMetric:
    """A metric by registered name, installed plug-in or `module:Class` (the only code ever imported)."""
    return METRICS.get(spec)


def ssim(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    """scikit-image SSIM (K1 = 0.01, K2 = 0.03) with the window shrunk to fit small tensors."""
    window = min(SSIM_WINDOW, *(d if d % 2 else d - 1 for d in a.shape))
    if window < 3:  # too small for a window: fall back to the global SSIM formula
        return _global_ssim(a, b, data_range)
    return float(structural_similarity(a, b, data_range=data_range or 1.0, win_size=window))


def _global_ssim(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    c1, c2 = (0.01 * (data_range or 1.0)) ** 2, (0.03 * (data_range or 1.0)) ** 2
    mean_a, mean_b = a.mean(), b.mean()
    covariance = ((a - mean_a) * (b - mean_b)).mean()
    return float((2 * mean_a * mean_b + c1) * (2 * covariance + c2)
                 / ((mean_a**2 + mean_b**2 + c1) * (a.var() + b.var() + c2)))


@register_metric
class DistributionSSIM(SensitivityMetric):
    """1 - SSIM between the FP and quantized weight distributions, as CDFs on 256 common points.

    CDFs, not histograms: a 256-bin histogram of a b-bit tensor is 2^b - 1 spikes, and its SSIM to
    the FP histogram *rose* as bits dropped on every ResNet-20 layer. The CDF version falls
    monotonically with bits on every layer of the ResNet-20 and ResNet-56 checkpoints, for vanilla
    and OAQ (tests/test_sensitivity.py). On extreme synthetic tails (Student-t, 3 degrees of
    freedom) 2-3 layers in 20 are not monotonic: the bulk then spans only a few of the 256 bins.
    Quantile-spaced points were tried and were worse on real layers (2 of 56 ResNet-56 layers).
    """

    name = "ssim_distribution"

    def score(self, layer, weight, quantized):
        return 1.0 - ssim(*distribution_cdfs(weight, quantized), data_range=1.0)


def distribution_cdfs(weight: torch.Tensor, quantized: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Empirical CDFs of both tensors on 256 bins spanning the FP weight range."""
    low, high = float(weight.min()), float(weight.max())
    if high <= low:
        high = low + 1e-12
    cdfs = []
    for tensor in (weight, quantized):
        counts = torch.histc(tensor.float().clamp(low, high), bins=HISTOGRAM_BINS, min=low, max=high)
        cdfs.append((counts.cumsum(0) / counts.sum()).double().numpy())
    return cdfs[0], cdfs[1]


@register_metric
class WeightSSIM(SensitivityMetric):
    """1 - SSIM between FP and quantized weights seen as a 2-D image (C_out x C_in*k*k)."""

    name = "ssim_weight"

    def score(self, layer, weight, quantized):
        image = weight.reshape(weight.shape[0], -1).double().numpy()
        other = quantized.reshape(quantized.shape[0], -1).double().numpy()
        return 1.0 - ssim(image, other, data_range=float(weight.max() - weight.min()))


@register_metric
class WeightMSE(SensitivityMetric):
    """Quantization error relative to the layer's own weight variance (scale-free across layers)."""

    name = "mse"

    def score(self, layer, weight, quantized):
        variance = float(weight.var()) or 1.0
        return float(((quantized - weight) ** 2).mean()) / variance


@register_metric
class HessianTrace(SensitivityMetric):
    """HAWQ-V2: mean Hessian trace per weight (Hutchinson) times the squared perturbation.

    The trace's magnitude is used: away from a minimum (or with few Hutchinson samples) a trace
    can come out negative, which would rank a bigger perturbation as less harmful.
    """

    name = "hessian"
    needs_data = True

    def __init__(self, images: int = 256, samples: int = 16, seed: int = 0, batch_size: int = 32):
        # batch_size: images per double backward pass. It bounds memory (DenseNet-100: about 10 GB at 64
        # images, over 20 GB at 256) and leaves the estimate as it is: the same vectors probe every batch.
        self.images, self.samples, self.seed, self.batch_size = images, samples, seed, batch_size
        self.trace_per_weight: dict[str, float] = {}

    def prepare(self, model, graph, data):
        if data is None:
            raise UserError("the hessian metric needs data: pass --data-root (it uses the search split)")
        modules = dict(model.named_modules())
        params = [modules[name].weight for name in graph.names]
        images, labels = next(data.batches(self.images))
        generator = torch.Generator().manual_seed(self.seed)
        vectors = [[torch.randint(0, 2, p.shape, generator=generator).float() * 2 - 1 for p in params]
                   for _ in range(self.samples)]
        totals = [0.0] * len(params)
        was_training = model.training
        model.eval()
        with torch.enable_grad():
            starts = range(0, len(labels), self.batch_size)
            for start in bar(len(starts), "hessian trace (per-layer sensitivity)", iterable=starts):
                batch = slice(start, start + self.batch_size)
                weight = len(labels[batch]) / len(labels)  # the mean loss's Hessian: batches weighted by size
                loss = F.cross_entropy(model(images[batch]), labels[batch])
                grads = torch.autograd.grad(loss, params, create_graph=True)
                for probe in vectors:
                    products = torch.autograd.grad(grads, params, grad_outputs=probe, retain_graph=True)
                    for index, (v, hv) in enumerate(zip(probe, products)):
                        totals[index] += weight * float((v * hv).sum())
        model.train(was_training)
        self.trace_per_weight = {name: abs(totals[i]) / self.samples / params[i].numel()
                                 for i, name in enumerate(graph.names)}

    def score(self, layer, weight, quantized):
        return self.trace_per_weight[layer] * float(((quantized - weight) ** 2).sum())
