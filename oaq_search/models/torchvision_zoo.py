"""The one guarded entry to torchvision, whose compiled ops cannot load on the CPU-only torch.

torchvision 0.28's import registers fake kernels for `torchvision::nms`/`qnms`, which fails when its
CUDA-built library could not define them. Declaring the two schemas first lets the pure-Python parts
(model zoo, datasets, transforms) import; `torchvision.ops.nms` stays unavailable.
"""

from __future__ import annotations

import functools
import sys
from types import ModuleType

import torch

from ..errors import UserError

_MISSING_OP_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

# Names of the ImageNet models we support; others in the zoo may trace too but are not tested.
IMAGENET_MODELS = ("resnet18", "resnet50", "mobilenet_v2")


@functools.cache
def import_torchvision() -> ModuleType:
    """Import torchvision, declaring its missing op schemas first when its compiled ops are absent."""
    try:
        try:
            import torchvision
        except RuntimeError:  # "operator torchvision::nms does not exist"
            _purge_partial_import()
            _declare_missing_ops()
            import torchvision
    except ImportError as error:
        raise UserError(
            f"torchvision is needed for this model but cannot be imported ({error}): "
            "run `pip install torch==2.13.0 && pip install -e '.[torchvision]'`"
        ) from error
    return torchvision


_declared_ops: list[torch.library.Library] = []  # a Library unregisters its ops when collected


def _declare_missing_ops() -> None:
    library = torch.library.Library("torchvision", "DEF")
    for schema in _MISSING_OP_SCHEMAS.values():
        library.define(schema)
    _declared_ops.append(library)


def _purge_partial_import() -> None:
    """Forget half-imported torchvision modules so the retry starts clean."""
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


def imagenet_model(name: str, num_classes: int = 1000) -> torch.nn.Module:
    """An untrained torchvision ImageNet model by name (weights come from a checkpoint)."""
    torchvision = import_torchvision()
    return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
