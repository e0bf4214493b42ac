"""A cached prefix: a forward pass that computes only from a given block onward.

Measuring a group's sensitivity quantizes the model with that group changed and every other group
as in a baseline, then runs it on the same images: the blocks before the group's first one compute
what the baseline computed. `record` keeps every block's output on each batch the baseline runs;
inside `skip(names)`, the blocks that run before the first of those layers return their recorded
output instead of computing it (on a batch never recorded they compute as usual). Every block
returns exactly what it would compute, so whatever reads it downstream (a skip connection, a
concatenation) gets the same values, in any topology. Calibration and BatchNorm correction run in
execution order, so a block's state depends only on what runs before it: unchanged in the prefix.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from .blocks import find_blocks

MIN_BYTES, MAX_BYTES = 2 * 1024**3, 8 * 1024**3  # what a cache may hold: a quarter of the free memory, in these
# bounds (2 GiB where the free memory cannot be read); beyond it, measure without one (the same scores, slower)


class PrefixCache:
    """Block outputs of one model state on fixed batches; `blocks` from the unwrapped model (names are kept)."""

    def __init__(self, model: nn.Module, example: torch.Tensor, layer_types: tuple[type, ...]):
        self.blocks = find_blocks(model, example, layer_types)
        self.layers = {block: {name for name, module in model.get_submodule(block).named_modules(prefix=block)
                               if isinstance(module, layer_types)} for block in self.blocks}
        self.outputs: dict[tuple, dict[str, torch.Tensor]] = {}
        self._batch: tuple | None = None

    def fits(self, model: nn.Module, example: torch.Tensor, images: int) -> bool:
        """Whether the blocks' outputs on `images` images (float32) fit in `memory_budget()`."""
        sizes = []
        handles = [model.get_submodule(name).register_forward_hook(lambda _m, _a, out: sizes.append(out[0].numel()))
                   for name in self.blocks]
        try:
            with torch.no_grad():
                model.eval()(example[:1])
        finally:
            for handle in handles:
                handle.remove()
        return 4 * sum(sizes) * images <= memory_budget()

    @contextlib.contextmanager
    def record(self, model: nn.Module) -> Iterator[None]:
        """Within it, `model`'s block outputs on every batch are kept (the baseline's, once)."""
        def keep(name):
            return lambda _module, _args, output: self.outputs.setdefault(self._batch, {}).__setitem__(
                name, output.detach())

        with self._tracking(model):
            handles = [model.get_submodule(name).register_forward_hook(keep(name)) for name in self.blocks]
            try:
                yield
            finally:
                for handle in handles:
                    handle.remove()

    @contextlib.contextmanager
    def skip(self, model: nn.Module, layers: set[str]) -> Iterator[None]:
        """Within it, the blocks that run before the first block holding one of `layers` return their output
        recorded on the batch at hand."""
        first = next((i for i, block in enumerate(self.blocks) if self.layers[block] & layers), len(self.blocks))
        originals = {}
        with self._tracking(model):
            try:
                for name in self.blocks[:first]:
                    module = model.get_submodule(name)
                    originals[name] = module.forward
                    module.forward = self._recorded(name, module.forward)
                yield
            finally:
                for name, forward in originals.items():
                    model.get_submodule(name).forward = forward

    def _recorded(self, name: str, compute):
        def forward(*args, **kwargs):
            stored = self.outputs.get(self._batch, {}).get(name)
            return stored if stored is not None else compute(*args, **kwargs)
        return forward

    @contextlib.contextmanager
    def _tracking(self, model: nn.Module) -> Iterator[None]:
        """Keys each forward pass of `model` by its input batch, so blocks know which batch they are on."""
        def enter(_module, args):
            self._batch = _key(args[0])

        handle = model.register_forward_pre_hook(enter)
        try:
            yield
        finally:
            handle.remove()
            self._batch = None


def _key(images: torch.Tensor) -> tuple:
    """A batch's identity: its shape and a sample of its values (batches of one split never collide)."""
    sample = images.detach().reshape(-1)[:: max(1, math.prod(images.shape) // 4096)]
    return tuple(images.shape), float(sample.double().sum()), float((sample.double() ** 2).sum())


def memory_budget(meminfo: str = "/proc/meminfo") -> int:
    """Bytes a prefix cache may hold: a quarter of the memory Linux reports available, at least MIN_BYTES and
    at most MAX_BYTES (ResNet-110's blocks on the measured and calibration images need 2.2 GB)."""
    try:
        with open(meminfo) as info:
            available = next(int(line.split()[1]) * 1024 for line in info if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return MIN_BYTES
    return max(MIN_BYTES, min(MAX_BYTES, available // 4))
