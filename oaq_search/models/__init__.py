"""Model registry: every model the CLI and study files can name, with its input shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..errors import UserError
from .cifar_resnet import cifar_resnet
from .densenet import DenseNetBC
from .torchvision_zoo import IMAGENET_MODELS, imagenet_model


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model and what one input image looks like (C, H, W)."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, int, int]


def _cifar(name: str, build: Callable[[], nn.Module]) -> ModelSpec:
    return ModelSpec(name, build, (3, 32, 32))


MODELS: dict[str, ModelSpec] = {
    **{
        f"resnet{depth}": _cifar(f"resnet{depth}", lambda depth=depth: cifar_resnet(depth))
        for depth in (20, 32, 44, 56, 110)
    },
    "densenet100": _cifar("densenet100", lambda: DenseNetBC(depth=100, growth_rate=12)),
    **{
        f"tv_{name}": ModelSpec(f"tv_{name}", lambda name=name: imagenet_model(name), (3, 224, 224))
        for name in IMAGENET_MODELS
    },
}


def model_spec(name: str) -> ModelSpec:
    """The registered spec for `name`, or a one-line error listing the known names."""
    try:
        return MODELS[name]
    except KeyError:
        raise UserError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}") from None


def build_model(name: str) -> nn.Module:
    """A freshly initialised model by registry name, in eval mode."""
    return model_spec(name).build().eval()
