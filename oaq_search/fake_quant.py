"""Fake-quant wrappers for Conv2d/Linear and `quantize_`, the one verb that applies a plan.

Applying a plan configures wrappers in place: the model is wrapped once, and every later plan
(a search trial) only re-quantizes weights, once per plan, never per batch. While training with
gradients the weight is re-quantized each step, the straight-through estimator passing gradients on.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .activations import ActivationQuantizer
from .errors import UserError
from .oaq import WeightQuantizer, fake_quantize_weight
from .plan import LayerPlan, Plan


class QuantizedLayer(nn.Module):
    """A Conv2d or Linear whose weight (and optionally input) are fake-quantized."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, name: str):
        super().__init__()
        self.layer = layer
        self.name = name
        self.weight_quantizer: WeightQuantizer | None = None
        self.input_quantizer: ActivationQuantizer | None = None
        self.register_buffer("cached_weight", None, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The full-precision weight, so code reading `module.weight` works on wrapped models too."""
        return self.layer.weight

    def configure(self, layer_plan: LayerPlan, calibration: str = "mse") -> None:
        self.weight_quantizer = layer_plan.weight_quantizer()
        bits = layer_plan.activation_bits
        if bits is None:
            self.input_quantizer = None
        elif self.input_quantizer is None:
            self.input_quantizer = ActivationQuantizer(bits, calibration)
        else:
            self.input_quantizer.set_bits(bits)
        self.refresh()

    def refresh(self) -> None:
        """Re-quantize and cache the weight for inference."""
        with torch.no_grad():
            self.cached_weight = self.quantized_weight()

    def quantized_weight(self) -> torch.Tensor:
        return fake_quantize_weight(self.layer.weight, self.weight_quantizer, self.name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        needs_grad = self.training and torch.is_grad_enabled()
        weight = self.quantized_weight() if needs_grad else self.cached_weight
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, weight, self.layer.bias)
        return F.linear(x, weight, self.layer.bias)


def quantize_(model: nn.Module, plan: Plan, calibration: str = "mse") -> nn.Module:
    """Apply `plan` to `model` in place, wrapping layers on first use; layers not in the plan stay FP."""
    modules = dict(model.named_modules())
    for layer_plan in plan.layers:
        module = modules.get(layer_plan.name)
        if isinstance(module, QuantizedLayer):
            module.configure(layer_plan, calibration)
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            wrapper = QuantizedLayer(module, layer_plan.name)
            wrapper.configure(layer_plan, calibration)
            _set_submodule(model, layer_plan.name, wrapper)
        else:
            found = "no such module" if module is None else f"a {type(module).__name__}"
            raise UserError(f"plan layer {layer_plan.name!r} is not a Conv2d or Linear of the model ({found})")
    planned = {layer.name for layer in plan.layers}
    for name, module in modules.items():
        if isinstance(module, QuantizedLayer) and name not in planned:
            _set_submodule(model, name, module.layer)  # dropped from the plan: back to full precision
    return model


def quantized_layers(model: nn.Module) -> Iterable[QuantizedLayer]:
    return (m for m in model.modules() if isinstance(m, QuantizedLayer))


def activation_quantizers(model: nn.Module) -> list[ActivationQuantizer]:
    return [layer.input_quantizer for layer in quantized_layers(model) if layer.input_quantizer is not None]


def calibrate_activations(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Observe the inputs of every activation quantizer on `batches` afresh, then fix their ranges."""
    observers = activation_quantizers(model)
    for observer in observers:
        observer.start_observing()
    model.eval()
    with torch.no_grad():  # not inference_mode: the observed buffers are later used with autograd
        for images in batches:
            model(images)
    for observer in observers:
        observer.freeze()


def needs_calibration(model: nn.Module) -> bool:
    return any(not quantizer.calibrated for quantizer in activation_quantizers(model))


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
