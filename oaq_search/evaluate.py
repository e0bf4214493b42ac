"""How good a model is on an image split: top-1 accuracy, or how far its predictions moved from a reference's."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Callable

import torch
from torch import nn

from .cache import cached_json
from .data import ImageSplit
from .layout import fast_layout
from .progress import bar

BATCH_SIZE = 100  # on CPU 1.6-2.2x faster per image than 500: activations stay in cache (benchmarks/inference_speed.py)


def accuracy(model: nn.Module, split: ImageSplit, batch_size: int = BATCH_SIZE, progress: bool | None = None) -> float:
    """Top-1 accuracy in percent. The progress bar shows only on a terminal unless forced."""
    return 100.0 * int(correct(model, split, batch_size, progress).sum()) / len(split)


def reference_accuracy(model: nn.Module, split: ImageSplit, batch_size: int = BATCH_SIZE,
                       progress: bool | None = None, cache_dir: str | None = "default") -> float:
    """`accuracy` of a model whose weights stay as they are (full precision): computed once per weights
    and split, then read from the cache (`oaq_search.cache`)."""
    return cached_json(model.state_dict(), {"split": split.fingerprint(), "version": 1}, "accuracy-",
                       lambda: accuracy(model, split, batch_size, progress), cache_dir)


def top1(outputs: torch.Tensor, split: ImageSplit) -> float:
    """Top-1 accuracy in percent of outputs already computed for `split` (another runtime's, say)."""
    return 100.0 * int((outputs.argmax(1) == split.labels.cpu()).sum()) / len(split)


def correct(model: nn.Module, split: ImageSplit, batch_size: int = BATCH_SIZE, progress: bool | None = False) -> torch.Tensor:
    """Whether `model`'s top-1 prediction is right, for each image of `split` (bool, N)."""
    return logits(model, split, batch_size, progress).argmax(1) == split.labels.cpu()


def paired_difference(scores: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """The mean of `scores - reference` over the same images, and its standard error: whether one model
    is really better than another, which two noisy accuracies alone cannot say."""
    difference = (scores - reference).double()
    error = float(difference.std()) / len(difference) ** 0.5 if len(difference) > 1 else 0.0
    return float(difference.mean()), error


def logits(model: nn.Module, split: ImageSplit, batch_size: int = BATCH_SIZE, progress: bool | None = False) -> torch.Tensor:
    """The model's outputs for every image of `split`, (N, classes): computed on its device, returned on the CPU
    (taken from `reusing`'s outputs for the batches it knows)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = bar(-(-len(split) // batch_size), f"eval {split.name}", progress, iterable=split.batches(batch_size))
    known_images, known_outputs = _KNOWN.get(id(model), (None, None))
    outputs, start = [], 0
    with torch.inference_mode():
        for images, _ in batches:
            end = start + len(images)
            if known_images is not None and end <= len(known_images) and torch.equal(images, known_images[start:end]):
                outputs.append(known_outputs[start:end])
            else:
                outputs.append(model(fast_layout(images.to(device), model)).float().cpu())
            start = end
    model.train(was_training)
    return torch.cat(outputs)


_KNOWN: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(model) -> its (images, outputs), inside `reusing`


@contextlib.contextmanager
def reusing(model: nn.Module, images: torch.Tensor, outputs: torch.Tensor | None) -> Iterator[None]:
    """Within it, `logits(model, ...)` takes its outputs on batches that are rows of `images` (the same
    rows in the same order) from `outputs` instead of running it: a search trial's calibration pass has
    just computed them on the first images of the split its score is taken on. `model` must not change
    inside."""
    if outputs is None:
        yield
        return
    _KNOWN[id(model)] = (images, outputs)
    try:
        yield
    finally:
        del _KNOWN[id(model)]


SCORES = ("accuracy", "kl")  # what a trial is scored by on the search split; higher is better for both


def split_scorer(score: str, split: ImageSplit, reference: nn.Module,
                 batch_size: int = BATCH_SIZE) -> Callable[[nn.Module], float]:
    """A model -> its score on `split`: top-1 accuracy in percent, or (kl) minus its mean KL divergence
    in nats from `reference`'s predictions."""
    per_image = image_scorer(score, split, reference, batch_size)
    return lambda model: float(per_image(model).mean())


def image_scorer(score: str, split: ImageSplit, reference: nn.Module,
                 batch_size: int = BATCH_SIZE) -> Callable[[nn.Module], torch.Tensor]:
    """A model -> its score on each image of `split` (100 or 0 for accuracy; minus the KL for kl), whose
    mean is `split_scorer`'s: two plans' paired differences show whether one is really better. The
    reference's predictions are computed once, on first use: commands that build a study's scorers
    without scoring (create, report) never pay for them."""
    if score == "accuracy":
        return lambda model: 100.0 * correct(model, split, batch_size).double()
    reference_logits = functools.cache(lambda: logits(reference, split, batch_size))
    return lambda model: -kl_per_image(reference_logits(), logits(model, split, batch_size)).double()


def format_score(score: str, value: float) -> str:
    return f"{value:.2f} %" if score == "accuracy" else f"KL {-value:.4f} nats"


def score_label(score: str) -> str:
    """An axis label for trial scores."""
    return "search-split accuracy (%)" if score == "accuracy" else "minus KL from full precision (nats)"


def kl_per_image(reference_logits: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """KL(reference || model) in nats for each image: how far quantization moved the predictions.

    Unlike top-1 accuracy it counts every image, not only those whose top class flips, so it
    ranks quantized plans with far less noise on few images."""
    reference = torch.log_softmax(reference_logits, dim=1)
    return torch.nn.functional.kl_div(torch.log_softmax(outputs, dim=1), reference, log_target=True,
                                      reduction="none").sum(dim=1)
