"""The memory layout images go into the model in: channels_last, where CPU convolutions run about
1.2x faster than in NCHW (benchmarks/inference_speed.py). Only inputs are converted; each layer's
output follows its input, and weights stay as they are (fake-quantized weights change every trial).
A model must then reshape with `flatten`/`reshape`, not `view`, as fine-tuning already asks."""

from __future__ import annotations

import torch


def fast_layout(images: torch.Tensor) -> torch.Tensor:
    """A batch of images (N, C, H, W) in channels_last; anything else unchanged."""
    return images.contiguous(memory_format=torch.channels_last) if images.dim() == 4 else images
