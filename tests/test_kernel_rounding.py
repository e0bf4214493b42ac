"""The plan's model rounds biases and outputs as ONNX Runtime's integer kernels do (real ORT, real ResNet-20)."""

import copy

import pytest
import torch

from oaq_search.activations import OutputHook, remove_output_hooks
from oaq_search.data import load_cifar10
from oaq_search.deploy import export_onnx
from oaq_search.fake_quant import unwrap
from oaq_search.kernel_rounding import outputs_unrounded
from oaq_search.oaq import int8_steps
from oaq_search.pipeline import layer_graph, load_model
from oaq_search.planning import PlanFactory
from oaq_search.ptq import post_training_quantize
from oaq_search.runtime import agreement, onnx_logits

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def w4a4(shared):
    model = load_model("resnet20", shared / "models" / "resnet20_cifar10jpeg.pt")
    plan = PlanFactory("resnet20", model, layer_graph("resnet20", model)).uniform(4, activation_bits=4)
    splits = load_cifar10(shared / "data" / "cifar10", search_size=500)
    return post_training_quantize(model, plan, splits.search), plan, splits


def output_hooks(model):
    return {name: hook for name, module in model.named_modules() for hook in module._forward_hooks.values()
            if isinstance(hook, OutputHook)}


def test_outputs_a_deployment_requantizes_on_their_own_are_rounded_after_their_batchnorm(w4a4):
    quantized, _plan, splits = w4a4
    hooked = output_hooks(quantized)
    # before each residual add (the stem's ReLU output feeds one too), and the logits; a block's first conv
    # passes a ReLU on to the second's input quantizer, whose grid rounds it
    assert set(hooked) == {"bn1", "linear"} | {f"layer{s}.{b}.bn2" for s in (1, 2, 3) for b in range(3)}
    assert hooked["layer2.1.bn2"].quantizer is quantized.layer2[1].conv2.output_quantizer
    assert float(quantized.layer2[1].conv2.output_quantizer.clip) > 0
    copied = copy.deepcopy(quantized)  # each copy rounds with its own quantizers
    assert output_hooks(copied)["layer2.1.bn2"].quantizer is copied.layer2[1].conv2.output_quantizer
    assert output_hooks(unwrap(quantized)) == {}  # a plain model no longer rounds
    unhooked = copy.deepcopy(quantized).eval()
    remove_output_hooks(unhooked)
    images = splits.search.images[:8]
    with torch.no_grad():
        rounded = quantized.eval()(images)
        with outputs_unrounded(quantized):  # as reconstruction runs it
            assert torch.equal(quantized(images), unhooked(images))
        assert torch.equal(quantized(images), rounded) and not torch.equal(rounded, unhooked(images))


def test_each_integer_layers_folded_bias_lies_on_its_int32_grid(w4a4):
    quantized, _plan, _splits = w4a4
    for block, index in ((quantized.layer1[0], 1), (quantized.layer3[2], 2)):  # before a ReLU; before an add
        conv, bn = getattr(block, f"conv{index}"), getattr(block, f"bn{index}")
        gain = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).double()
        folded = bn.bias.double() - gain * bn.running_mean.double()
        _low, high = conv.input_quantizer.range
        grid = int8_steps(conv.codes(), "uniform", 4) * high / 15 * gain.abs()
        units = folded / grid
        assert (units - units.round()).abs().max() < 0.01
        assert units.abs().max() > 10  # the grid is much finer than the bias: a test that can fail


def test_onnx_runtimes_integer_kernels_compute_the_w4a4_plans_model(w4a4, tmp_path):
    """The two roundings were 95 % the same class at W4A4; with them in the plan's model, all but chance ties."""
    quantized, plan, splits = w4a4
    calibration, test = next(splits.search.batches(500))[0], splits.test.subset(1000)
    export_onnx(quantized, plan, calibration, tmp_path / "w4a4.onnx")
    deployed = onnx_logits(tmp_path / "w4a4.onnx", test, threads=1)
    with torch.no_grad():
        planned = torch.cat([quantized(images) for images, _ in test.batches(250)])
    assert agreement(deployed, planned) >= 0.997
    assert torch.quantile((deployed - planned).abs().max(1).values, 0.9) < 1e-3 * planned.abs().max()
