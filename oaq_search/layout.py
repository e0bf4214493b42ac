"""The memory layout images go into the model in: channels_last, where CPU convolutions run about
1.2x faster than in NCHW (benchmarks/inference_speed.py). Only inputs are converted; each layer's
output follows its input, and weights stay as they are (fake-quantized weights change every trial).

A model that reshapes with `view` where channels_last makes the tensor non-contiguous cannot take
it: `choose_layout` tries once and marks such a model NCHW; copies of it (deepcopy) keep the mark.
"""

from __future__ import annotations

import torch
from torch import nn

_NCHW_ONLY = "_oaq_nchw_only"  # attribute set on a model whose forward fails on channels_last inputs


def choose_layout(model: nn.Module, example: torch.Tensor) -> bool:
    """Run `model` once on `example` in channels_last; if that fails and NCHW works, keep the model on
    NCHW from then on. Returns whether channels_last is used."""
    if example.dim() != 4:
        return False
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                model(example.contiguous(memory_format=torch.channels_last))
            except RuntimeError:
                model(example.contiguous())  # a failure here is the model's own: let it surface
                setattr(model, _NCHW_ONLY, True)
    finally:
        model.train(was_training)
    return channels_last_works(model)


def channels_last_works(model: nn.Module) -> bool:
    return not getattr(model, _NCHW_ONLY, False)


def fast_layout(images: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """A batch of images (N, C, H, W) in channels_last unless `model` needs NCHW; anything else unchanged."""
    if images.dim() == 4 and channels_last_works(model):
        return images.contiguous(memory_format=torch.channels_last)
    return images
