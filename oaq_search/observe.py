"""One inference pass that shows chosen modules their inputs: BN correction and (s, T) scoring use it."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from .layout import fast_layout


def observe_inputs(model: nn.Module, modules: Mapping[str, nn.Module], images: torch.Tensor,
                   observe: Callable[[str, nn.Module, torch.Tensor], None]) -> torch.Tensor:
    """Run `model` on `images` once (eval mode, no grad), calling observe(name, module, input) as
    each of `modules` is reached; hooks and the training flag are restored afterwards. Returns the
    model's output."""
    handles = [module.register_forward_pre_hook(lambda m, args, name=name: observe(name, m, args[0]))
               for name, module in modules.items()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            return model(fast_layout(images, model))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
