"""Where training steps run (fine-tuning, reconstruction): a lent GPU when there is one."""

from __future__ import annotations

import torch

from .errors import UserError


def training_device(name: str) -> torch.device:
    """The device a study's `device` setting names: `auto` picks CUDA when PyTorch sees a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but PyTorch sees no CUDA GPU: use device = 'auto' or 'cpu'")
    return torch.device(name)
