"""A model's blocks: the modules reconstruction fits one at a time and a cached prefix stops at.

A block is a module with at most MAX_BLOCK_LAYERS layers that runs once per forward pass with one
tensor in and one out (a residual block, a dense block's layer), else its children, down to single
layers. Blocks are disjoint and listed in execution order; found by running the model once.
"""

from __future__ import annotations

import torch
from torch import nn

MAX_BLOCK_LAYERS = 4  # a module with more layers is split into its children (a stage, a whole model)


def find_blocks(model: nn.Module, example: torch.Tensor, layer_types: type | tuple[type, ...]) -> list[str]:
    """Qualified names of `model`'s blocks in execution order (found on `example`); a layer is a module
    of `layer_types`, never looked into. A layer that runs more than once is in no block."""
    layer_counts = {name: _count(module, layer_types) for name, module in model.named_modules()}
    calls: dict[str, list[bool]] = {}

    def record(name):
        def hook(_module, args, kwargs, output):
            simple = len(args) == 1 and not kwargs and torch.is_tensor(args[0]) and torch.is_tensor(output)
            calls.setdefault(name, []).append(simple)
        return hook

    handles = [module.register_forward_hook(record(name), with_kwargs=True)
               for name, module in model.named_modules() if name and layer_counts[name]]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for handle in handles:
            handle.remove()

    def visit(name: str, module: nn.Module) -> list[str]:
        usable = calls.get(name) == [True]
        if isinstance(module, layer_types):
            return [name] if usable else []
        container = isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) or not name
        if usable and not container and layer_counts[name] <= MAX_BLOCK_LAYERS:
            return [name]
        return [block for child, submodule in module.named_children() if layer_counts[_join(name, child)]
                for block in visit(_join(name, child), submodule)]

    order = list(calls)  # by when each call ended: for disjoint blocks, the order they ran in
    return sorted(visit("", model), key=order.index)


def _count(module: nn.Module, layer_types) -> int:
    if isinstance(module, layer_types):
        return 1
    return sum(_count(child, layer_types) for child in module.children())


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child
