"""Measured group sensitivity: how far the network's output moves when only one tie group is quantized.

The per-layer tables score a layer from its weights (or a Hessian trace), with their own (s, T).
This measures, per tie group and candidate bit-width, the KL divergence of the network's softmax
from full precision on held-out search images, with that group at the candidate and every other
group at its widest, through exactly the path the search scores plans with ((s, T) rule,
activation ranges, BatchNorm correction). Seeds and repair then minimise the summed divergence.
Measured on ResNet-20 at the 3-bit budget: its integer-program seed scores 86.06 % on test against
85.53 % from the Hessian table (uniform 3-bit OAQ: 85.25 %).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..cache import cached_json
from ..evaluate import BATCH_SIZE
from ..layout import fast_layout
from ..oaq import REVISION
from ..prefix import PrefixCache
from ..progress import bar

# Part of the cache key; 2: activation ranges and BN correction fitted in one pass, so a move's score
# no longer depends on the move measured before it.
_VERSION = 2

Quantize = Callable[[list[int]], nn.Module]  # one candidate index per group -> the model quantized that way


def measure_group_sensitivity(quantize: Quantize, candidate_counts: list[int], reference: nn.Module,
                              images: torch.Tensor, progress: bool | None = None, prefix: PrefixCache | None = None,
                              group_layers: list[list[str]] | None = None) -> np.ndarray:
    """scores[g][k]: KL(full precision || group g at candidate k, the rest widest); inf past a group's list.

    A group at its widest is the all-widest plan, measured once. With `prefix` (and each group's layer
    names), a move computes only from its group's first block on: the blocks before it compute what the
    all-widest plan did, recorded once (the scores are the same)."""
    target = _log_probabilities(reference, images)
    widest = [count - 1 for count in candidate_counts]
    scores = np.full((len(candidate_counts), max(candidate_counts)), np.inf)
    moves = [(group, index) for group, count in enumerate(candidate_counts) for index in range(count - 1)]
    with bar(len(moves) + 1, "measure sensitivity (each group at each setting)", progress) as counter:
        model = quantize(widest)  # wraps the layers: the recording hooks attach to the wrappers
        with prefix.record(model) if prefix else contextlib.nullcontext():
            baseline = _divergence(quantize(widest) if prefix else model, images, target)
        counter.update(1)
        for group, index in moves:
            choice = list(widest)
            choice[group] = index
            with prefix.skip(model, set(group_layers[group])) if prefix else contextlib.nullcontext():
                scores[group][index] = _divergence(quantize(choice), images, target)
            counter.update(1)
    for group, last in enumerate(widest):
        scores[group][last] = baseline
    return scores


def cached_group_sensitivity(key: Mapping[str, object], reference: nn.Module, measure: Callable[[], np.ndarray],
                             cache_dir: str | Path | None = "default") -> np.ndarray:
    """`measure()`, or its stored result for the same `key` (settings) and `reference` weights."""
    def measured() -> list[list[float | None]]:  # JSON has no infinity: None where a group has no such setting
        scores = measure()
        return np.where(np.isfinite(scores), scores, None).tolist()

    stored = cached_json(reference.state_dict(), {**key, "version": _VERSION, "quantizer": REVISION}, "measured-",
                         measured, cache_dir)
    return np.array([[np.inf if v is None else v for v in row] for row in stored])


def _divergence(model: nn.Module, images: torch.Tensor, target: torch.Tensor) -> float:
    return float(F.kl_div(_log_probabilities(model, images), target, log_target=True, reduction="batchmean"))


def _log_probabilities(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([F.log_softmax(model(fast_layout(batch, model)), dim=1) for batch in images.split(BATCH_SIZE)])
