"""Fake-quant wrappers for Conv2d/Linear and `quantize_`, the one verb that applies a plan.

Applying a plan configures wrappers in place: the model is wrapped once, and every later plan
(a search trial) only re-quantizes weights, once per plan, never per batch. While fine-tuning (a
gradient is wanted for the weight or OAQ's s) the weight is re-quantized once per step, the
straight-through estimator passing gradients on.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .activations import ActivationQuantizer, OutputQuantizer, remove_output_hooks
from .errors import UserError
from .layout import fast_layout
from .oaq import QuantizedWeight, WeightQuantizer, fake_quantize_weight, quantize_weight
from .plan import LayerPlan, Plan


class QuantizedLayer(nn.Module):
    """A Conv2d or Linear whose weight (and optionally input) are fake-quantized."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, name: str):
        super().__init__()
        self.layer = layer
        self.name = name
        self.weight_quantizer: WeightQuantizer | None = None
        self.input_quantizer: ActivationQuantizer | None = None
        # int8 rounding of the output where a deployment requantizes it (`kernel_rounding.py`), applied by an
        # `OutputHook` on the module computing the output: this layer, or its BatchNorm
        self.output_quantizer: OutputQuantizer | None = None
        self.register_parameter("scale_logit", None)  # learnable OAQ s = sigmoid(scale_logit), fine-tuning only
        self.register_buffer("cached_weight", None, persistent=False)
        self.register_buffer("round_up", None)  # 0/1 per weight, learned by reconstruction; None: nearest level
        self.rounding: nn.Module | None = None  # while reconstruction learns the rounding: computes the weight

    @property
    def weight(self) -> torch.Tensor:
        """The full-precision weight, so code reading `module.weight` works on wrapped models too."""
        return self.layer.weight

    def configure(self, layer_plan: LayerPlan, calibration: str = "mse") -> None:
        quantizer = layer_plan.weight_quantizer()
        if self.weight_quantizer is None or _lattice(quantizer) != _lattice(self.weight_quantizer):
            self.round_up = None  # a learned rounding belongs to its grid; a change of s or T keeps it
        self.weight_quantizer = quantizer
        self.scale_logit = None
        bits = layer_plan.activation_bits
        if bits is None:
            self.input_quantizer = None
        elif self.input_quantizer is None:
            self.input_quantizer = ActivationQuantizer(bits, calibration)
        else:
            self.input_quantizer.set_bits(bits)
        if self.input_quantizer is not None and layer_plan.activation_range is not None:
            self.input_quantizer.set_range(*layer_plan.activation_range)
        self.refresh()

    def learn_scale_factor(self) -> nn.Parameter | None:
        """Make OAQ's s trainable (as a logit, so it stays in [0, 1]); None for vanilla layers."""
        if self.weight_quantizer.method == "vanilla":
            return None
        start = min(max(self.weight_quantizer.scale_factor, 0.01), 0.99)
        self.scale_logit = nn.Parameter(torch.logit(torch.tensor(start, device=self.layer.weight.device)))
        return self.scale_logit

    @property
    def scale_factor(self) -> float:
        """OAQ's s as it is now: learned when training it, else the plan's."""
        if self.scale_logit is None:
            return self.weight_quantizer.scale_factor
        return float(torch.sigmoid(self.scale_logit.detach()))

    def refresh(self) -> None:
        """Re-quantize and cache the weight for inference."""
        with torch.no_grad():
            self.cached_weight = self.quantized_weight()

    def quantized_weight(self) -> torch.Tensor:
        scale_factor = None if self.scale_logit is None else torch.sigmoid(self.scale_logit)
        return fake_quantize_weight(self.layer.weight, self.weight_quantizer, self.name, scale_factor, self.round_up)

    def codes(self) -> QuantizedWeight:
        """The integer codes, scale and offset of the weight as the model computes it: what is packed."""
        return quantize_weight(self.layer.weight, self.weight_quantizer, self.name, self.round_up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        learning = self.layer.weight.requires_grad or (self.scale_logit is not None and self.scale_logit.requires_grad)
        if self.rounding is not None:
            weight = self.rounding()
        else:
            weight = self.quantized_weight() if learning and torch.is_grad_enabled() else self.cached_weight
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, weight, self.layer.bias)
        return F.linear(x, weight, self.layer.bias)


def _lattice(quantizer: WeightQuantizer) -> tuple:
    return quantizer.bits, quantizer.grid, quantizer.method, quantizer.per_channel


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


def calibrate_activations(model: nn.Module, batches: Iterable[torch.Tensor],
                          observers: list[ActivationQuantizer | OutputQuantizer] | None = None) -> None:
    """Observe what every activation quantizer (or `observers`) sees on `batches` afresh, then fix their
    ranges."""
    observers = activation_quantizers(model) if observers is None else observers
    for observer in observers:
        observer.start_observing()
    model.eval()
    with torch.no_grad():  # not inference_mode: the observed buffers are later used with autograd
        for images in batches:
            model(fast_layout(images, model))
    for observer in observers:
        observer.freeze()


def learned_plan(quantized: nn.Module, plan: Plan) -> Plan:
    """`plan` with each layer's current s and activation range, read off a fine-tuned or
    reconstructed model."""
    changes = {}
    for layer in quantized_layers(quantized):
        change = {"scale_factor": round(layer.scale_factor, 6)}
        if layer.input_quantizer is not None:
            change["activation_range"] = [round(bound, 6) for bound in layer.input_quantizer.range]
        changes[layer.name] = change
    return plan.with_layers(changes)


def needs_calibration(model: nn.Module) -> bool:
    return any(not quantizer.calibrated for quantizer in activation_quantizers(model))


def unwrap(model: nn.Module) -> nn.Module:
    """A copy of `model` with every wrapper replaced by its full-precision layer: a plain checkpoint's model."""
    plain = copy.deepcopy(model)
    remove_output_hooks(plain)
    for layer in list(quantized_layers(plain)):
        _set_submodule(plain, layer.name, layer.layer)
    return plain


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
