"""Deploying: the packed model as QDQ ONNX that ONNX Runtime runs with integer kernels (real ORT, no mocks)."""

import dataclasses
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from oaq_search.cli import main
from oaq_search.deploy import DeployableLayer, _integer_weight, _packed_weight, export_onnx
from oaq_search.errors import UserError
from oaq_search.graph import build_layer_graph
from oaq_search.oaq import WeightQuantizer, dequantize, quantize_weight
from oaq_search.packing import load_packed
from oaq_search.planning import PlanFactory
from oaq_search.ptq import post_training_quantize
from oaq_search.runtime import kernel_counts

REPO = Path(__file__).resolve().parents[1]


def layer_of(weight: torch.Tensor, quantizer: WeightQuantizer) -> DeployableLayer:
    return DeployableLayer(quantize_weight(weight, quantizer), quantizer.grid, quantizer.bits, 8, (0.0, 1.0))


@pytest.mark.parametrize("grid, bits", [("uniform", 2), ("uniform", 3), ("uniform", 4), ("uniform", 8),
                                        ("midrise", 3), ("pot", 4)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_codes_hold_the_plans_weights_exactly(grid, bits, per_channel):
    """Plans hold OAQ's offset mu where int8 reaches it (`oaq.int8_offset`), so the codes need no residual."""
    torch.manual_seed(0)
    weight = torch.randn(16, 8, 3, 3) * 0.1 + 0.02 * torch.randn(16, 1, 1, 1)  # offsets no whole number of steps
    quantizer = WeightQuantizer(bits, grid, scale_factor=0.3, per_channel=per_channel)
    layer = layer_of(weight, quantizer)
    integer = _integer_weight("conv", layer)
    planned = dequantize(layer.weight, quantizer).double().numpy()
    assert integer.codes.dtype == np.int8
    assert np.abs(planned - integer.representable()).max() < 1e-6 * np.abs(planned).max()
    assert np.abs(integer.offset).max() < 1e-6 * integer.step.max()


@pytest.mark.parametrize("bits", [4, 8])
def test_a_plan_quantized_before_offsets_were_held_deploys_up_to_a_per_channel_constant(bits):
    weight = torch.randn(16, 8, 3, 3) * 0.1 + 0.013
    quantizer = WeightQuantizer(bits, scale_factor=0.3)
    held = quantize_weight(weight, quantizer)
    layer = DeployableLayer(dataclasses.replace(held, offset=weight.mean()), quantizer.grid, bits, 8, (0.0, 1.0))  # mu as it was
    integer = _integer_weight("conv", layer)
    planned = dequantize(layer.weight, quantizer).double().numpy()
    error = planned - integer.representable() - integer.offset.reshape(-1, 1, 1, 1)
    if bits < 8:  # the plan's own codes, refined: exact but for the constant residual the bias takes
        assert np.abs(error).max() < 1e-6
        assert 0 < np.abs(integer.offset).max() <= integer.step.max() / 2 + 1e-12
    else:  # 255 levels fill int8: rounded afresh, each channel's mean error kept as its residual
        assert np.abs(error.reshape(16, -1).mean(1)).max() < 1e-7 and np.abs(error).max() <= integer.step.max()


def test_a_grid_int8_cannot_hold_is_refused_naming_the_layer():
    with pytest.raises(UserError, match="layer conv: the pot grid at 6 bits has levels int8 codes cannot hold"):
        _integer_weight("conv", layer_of(torch.randn(4, 4, 3, 3), WeightQuantizer(6, grid="pot")))
    with pytest.raises(UserError, match="layer conv: the ipot grid at 5 bits has levels no integer type holds"):
        _packed_weight("conv", layer_of(torch.randn(4, 4, 3, 3), WeightQuantizer(5, grid="ipot")))


def example_model():
    """A model users write (examples/own_model: depthwise convs, ReLU6, a two-branch stem, nested
    Sequentials), untrained, and its layer graph."""
    sys.path.insert(0, str(REPO / "examples" / "own_model"))
    try:
        from model import build
    finally:
        sys.path.remove(str(REPO / "examples" / "own_model"))
    torch.manual_seed(0)
    model = build().eval()
    return model, build_layer_graph(model, (3, 32, 32))


def test_the_examples_own_model_exports_with_every_layer_an_integer_kernel(tmp_path):
    model, graph = example_model()
    images = torch.randn(64, 3, 32, 32)
    plan = PlanFactory("tiny", model, graph).uniform(4, 8)
    from oaq_search.data import ImageSplit

    quantized = post_training_quantize(model, plan, ImageSplit("search", images, torch.zeros(64, dtype=torch.long)))
    export_onnx(quantized, plan, images, tmp_path / "tiny.onnx")
    assert kernel_counts(tmp_path / "tiny.onnx") == {"integer": len(graph.names), "float": 0}
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.onnx"]  # nothing half-written left beside it


def test_packed_weights_store_each_layers_codes_in_the_narrowest_integer_and_run_the_plan_exactly(tmp_path):
    """Mixed bits and grids, weight-only layers among them: int2/int4/int8 initializers, the plan's weights
    exactly (the grid's offset and mu added after dequantization), the plan's model in ONNX Runtime."""
    import onnx
    from onnx import numpy_helper

    from oaq_search.data import ImageSplit
    from oaq_search.deploy import deployable_layers, reference_model
    from oaq_search.runtime import onnx_logits

    model, graph = example_model()
    images = torch.randn(64, 3, 32, 32)
    plan = PlanFactory("tiny", model, graph).uniform(4, 8)
    settings = [(2, "uniform", 8), (3, "midrise", 8), (3, "pot", None), (6, "uniform", 4), (4, "ipot", 8),
                (8, "uniform", 8), (4, "uniform", None)]
    plan = dataclasses.replace(plan, layers=[dataclasses.replace(
        layer, **dict(zip(("weight_bits", "grid", "activation_bits"), settings[index % len(settings)])))
        for index, layer in enumerate(plan.layers)])
    quantized = post_training_quantize(model, plan, ImageSplit("search", images, torch.zeros(64, dtype=torch.long)))
    path = tmp_path / "packed.onnx"
    export_onnx(quantized, plan, images, path, weights="packed")
    stored = {init.name.removesuffix(".weight.codes"): init.data_type for init in onnx.load(path).graph.initializer
              if init.name.endswith(".weight.codes")}
    int2, int4, int8 = onnx.TensorProto.INT2, onnx.TensorProto.INT4, onnx.TensorProto.INT8
    containers = {(2, "uniform"): int2, (3, "midrise"): int4, (3, "pot"): int4, (6, "uniform"): int8,
                  (4, "ipot"): int8, (8, "uniform"): int8, (4, "uniform"): int4}  # 4-bit IPoT's levels: 64ths
    assert stored == {layer.name: containers[layer.weight_bits, layer.grid] for layer in plan.layers}
    split = ImageSplit("test", images, torch.zeros(64, dtype=torch.long))
    deployed = onnx_logits(path, split, threads=1)
    planned = quantized(images).detach()
    assert (deployed.argmax(1) == planned.argmax(1)).float().mean() >= 0.95
    assert torch.quantile((deployed - planned).abs().max(1).values, 0.5) < 1e-4 * planned.abs().max()  # int8: 3e-3
    with pytest.raises(UserError, match="unknown weight format 'int3'"):
        export_onnx(quantized, plan, images, tmp_path / "x.onnx", weights="int3")


def test_quantized_skips_let_onnx_runtime_run_residual_adds_as_integer_adds(tmp_path):
    import collections

    import onnx
    import onnxruntime

    from oaq_search.data import ImageSplit
    from oaq_search.pipeline import layer_graph, load_model
    from oaq_search.runtime import agreement, onnx_logits

    torch.manual_seed(0)
    model, images = load_model("resnet20"), torch.rand(64, 3, 32, 32)
    plan = PlanFactory("resnet20", model, layer_graph("resnet20", model)).uniform(4, 8)
    quantized = post_training_quantize(model, plan, ImageSplit("search", images, torch.zeros(64, dtype=torch.long)))
    adds, float_shortcuts = {}, {}
    for quantize_skips in (False, True):
        path, optimized = tmp_path / f"{quantize_skips}.onnx", tmp_path / f"{quantize_skips}.opt.onnx"
        export_onnx(quantized, plan, images, path, quantize_skips=quantize_skips)
        options = onnxruntime.SessionOptions()
        options.optimized_model_filepath = str(optimized)
        onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        nodes = onnx.load(optimized).graph.node
        adds[quantize_skips] = collections.Counter(node.op_type for node in nodes)["QLinearAdd"]
        producers = {output: node.op_type for node in nodes for output in node.output}
        float_shortcuts[quantize_skips] = [node.name for node in nodes if node.op_type in ("Slice", "Pad")
                                           and producers.get(node.input[0]) == "DequantizeLinear"]
    assert adds == {False: 0, True: 8}  # all but the last block's add
    assert float_shortcuts[True] == []  # the shortcuts' Slice and Pad run on the uint8 codes
    split = ImageSplit("test", images, torch.zeros(64, dtype=torch.long))
    assert agreement(onnx_logits(tmp_path / "True.onnx", split, threads=1), quantized(images).detach()) >= 0.9
    with pytest.raises(UserError, match="packed weights do not run on"):
        export_onnx(quantized, plan, images, tmp_path / "x.onnx", weights="packed", quantize_skips=True)


@pytest.mark.shared
def test_deploy_check_runs_the_packed_plan_in_onnx_runtime_as_pytorch_does(shared, tmp_path, capsys):
    packed, onnx_file = tmp_path / "w4a8.packed.pt", tmp_path / "w4a8.onnx"
    common = ["--data-root", str(shared / "data" / "cifar10")]
    assert main(["quantize", "--model", "resnet20", "--checkpoint", str(shared / "models" / "resnet20_cifar10jpeg.pt"),
                 "--wbits", "4", "--abits", "8", "--split", "search", "--out", str(packed), *common]) == 0
    capsys.readouterr()
    assert main(["deploy", str(packed), "--out", str(onnx_file), "--check", "--test-images", "500", *common]) == 0
    out = capsys.readouterr().out
    assert "20 of 20 convolutions and linears run as ONNX Runtime integer kernels" in out
    deployed, planned, change, error, same = map(float, re.search(
        r"(\S+) % \(PyTorch, same plan: (\S+) %; change (\S+) ± (\S+),.*the same class for (\S+) %", out).groups())
    assert abs(deployed - planned) <= 1.0 and same >= 97.0, out
    assert change == pytest.approx(deployed - planned, abs=0.01) and 0 <= error < 1.0  # paired, over 500 images
    assert "batch 64" in out and onnx_file.stat().st_size < 400_000  # int8 codes: under half the float file
    data_free = tmp_path / "data_free.onnx"  # the packed model carries its ranges and input shape: no data needed
    assert main(["deploy", str(packed), "--out", str(data_free)]) == 0
    assert data_free.read_bytes() == onnx_file.read_bytes()
    payload = torch.load(packed, weights_only=True)  # as written before output ranges and the input shape
    payload["state"] = {k: v for k, v in payload["state"].items() if not k.endswith("output_quantizer.clip")}
    del payload["input_shape"]
    torch.save(payload, tmp_path / "old.packed.pt")
    capsys.readouterr()
    assert main(["deploy", str(tmp_path / "old.packed.pt"), "--out", str(tmp_path / "old.onnx")]) == 2
    err = capsys.readouterr().err
    assert "layer outputs have no int8 range" in err and "pass --data-root" in err and err.count("\n") == 1, err
    assert not (tmp_path / "old.onnx").exists()


@pytest.mark.shared
def test_deploy_runs_weight_only_layers_in_float_and_refuses_what_it_cannot_export(shared, tmp_path, capsys):
    packed = tmp_path / "w4.packed.pt"
    assert main(["quantize", "--model", "resnet20", "--wbits", "4", "--split", "search", "--out", str(packed),
                 "--data-root", str(shared / "data" / "cifar10"), "--checkpoint",
                 str(shared / "models" / "resnet20_cifar10jpeg.pt")]) == 0
    capsys.readouterr()
    weights_only = tmp_path / "weights_only.onnx"  # no activation bits: float kernels on the dequantized weights
    assert main(["deploy", str(packed), "--out", str(weights_only), "--data-root", str(shared / "data" / "cifar10")]) == 0
    assert "0 of 20 convolutions and linears run as ONNX Runtime integer kernels" in capsys.readouterr().out
    packed_onnx = tmp_path / "packed.onnx"  # int4 codes: 4-bit weights at their size (the float file: 1,068 KiB)
    assert main(["deploy", str(packed), "--out", str(packed_onnx), "--weights", "packed", "--data-root",
                 str(shared / "data" / "cifar10")]) == 0
    assert "packed weights: ONNX Runtime dequantizes them" in capsys.readouterr().out
    assert packed_onnx.stat().st_size < 200_000
    cases = [([str(packed), "--model", "resnet56"], "does not fit model"),
             ([str(tmp_path / "w4.packed.plan.json")], "cannot be read")]
    for arguments, message in cases:
        assert main(["deploy", *arguments, "--out", str(tmp_path / "x.onnx"), "--data-root",
                     str(shared / "data" / "cifar10")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(UserError, match="does not exist"):
        load_packed(tmp_path / "missing.pt")
