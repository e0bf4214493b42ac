import copy

import pytest
import torch

from hwmodels import MemoryModel, get_cost_model
from oaq_search import grids
from oaq_search.errors import UserError
from oaq_search.fake_quant import calibrate_activations, quantize_
from oaq_search.graph import build_layer_graph
from oaq_search.models import build_model
from oaq_search.oaq import QuantizedWeight, dequantize, quantize_weight
from oaq_search.packing import pack_codes, pack_model, unpack_codes
from oaq_search.plan import LayerPlan, Plan, packing_for


@pytest.mark.parametrize("grid", ["uniform", "midrise"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_codes_pack_densely_and_unpack_exactly(bits, grid):
    low, high = grids.code_range(grid, bits)
    codes = torch.randint(low, high + 1, (7, 3, 3, 3), dtype=torch.int8)
    codes.view(-1)[:2] = torch.tensor([low, high])  # both ends of the range
    packed = pack_codes(codes, bits, grid=grid)
    assert packed.numel() == -(-codes.numel() * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, tuple(codes.shape), grid=grid), codes)


def test_midrise_two_bit_codes_are_not_ternary_so_base3_refuses_them():
    with pytest.raises(UserError, match="ternary codes only"):
        pack_codes(torch.tensor([-2, -1, 0, 1], dtype=torch.int8), 2, "base3", "midrise")
    with pytest.raises(UserError, match="ternary codes only"):
        LayerPlan("conv1", 2, grid="midrise", code_packing="base3")
    assert packing_for("base3", 2, "midrise") == "fields" and packing_for("base3", 2, "uniform") == "base3"


def test_ternary_codes_pack_five_to_a_byte_and_unpack_exactly():
    codes = torch.randint(-1, 2, (7, 3, 3, 3), dtype=torch.int8)  # 189 codes: the last byte holds 4
    packed = pack_codes(codes, 2, "base3")
    assert packed.numel() == 38
    assert torch.equal(unpack_codes(packed, 2, tuple(codes.shape), "base3"), codes)


def test_ternary_packed_file_matches_its_cost_model(tmp_path):
    model = build_model("resnet20")
    graph = build_layer_graph(model, (3, 32, 32))
    plan = Plan.uniform("resnet20", graph, 2, code_packing="base3").with_layers(
        {"conv1": {"weight_bits": 8, "code_packing": "fields"}, "layer1.0.conv1": {"weight_bits": 3, "code_packing": "fields"}})
    quantized = quantize_(copy.deepcopy(model), plan)
    payload = pack_model(quantized, plan, tmp_path / "model.pt")
    assert payload == get_cost_model("memory-base3").evaluate(graph, plan).totals["weight_bytes"]
    layers = torch.load(tmp_path / "model.pt", weights_only=True)["layers"]
    entry = layers["layer3.2.conv2"]
    assert entry["packing"] == "base3" and entry["codes"].numel() == -(-64 * 64 * 9 // 5)
    assert torch.equal(unpack_codes(entry["codes"], 2, tuple(entry["shape"]), "base3"),
                       quantize_weight(quantized.layer3[2].conv2.layer.weight,
                                       quantized.layer3[2].conv2.weight_quantizer).codes)


def test_packed_file_matches_the_memory_model_and_loads_safely(tmp_path):
    model = build_model("resnet20")
    with torch.no_grad():  # the midrise layer's largest weight at both signs, so both end codes are used
        weight = model.layer2[0].conv1.weight.view(-1)
        weight[:2] = torch.tensor([1.0, -1.0]) * weight.abs().max()
    graph = build_layer_graph(model, (3, 32, 32))
    plan = Plan.uniform("resnet20", graph, 3).with_layers({"conv1": {"weight_bits": 8, "per_channel": True},
                                                           "layer2.0.conv1": {"grid": "midrise"}})
    quantized = quantize_(copy.deepcopy(model), plan)
    payload = pack_model(quantized, plan, tmp_path / "model.pt")
    report = MemoryModel().evaluate(graph, plan)
    assert payload == report.totals["weight_bytes"]
    # reference: 268,336 weights; conv1 (432) at 8 bits, the rest at 3 bits, plus scales and the bias
    codes = -(-432 * 8 // 8) + sum(-(-graph.info(n).weight_count * 3 // 8) for n in graph.names[1:])
    assert report.totals["weight_bytes"] == codes + 4 * (2 * 16 + 2 * 19 + 10)
    loaded = torch.load(tmp_path / "model.pt", weights_only=True)
    assert loaded["layers"]["layer1.0.conv1"]["bits"] == 3 and Plan.from_dict(__import__("json").loads(loaded["plan"]))
    entry, layer = loaded["layers"]["layer2.0.conv1"], quantized.layer2[0].conv1  # midrise: 8 codes, no zero
    codes = unpack_codes(entry["codes"], 3, tuple(entry["shape"]), grid=entry["grid"])
    assert entry["grid"] == "midrise" and codes.min() == -4 and codes.max() == 3
    rebuilt = dequantize(QuantizedWeight(codes, entry["scale"], entry["offset"]), layer.weight_quantizer)
    assert torch.allclose(rebuilt, layer.quantized_weight(), atol=1e-6)


def test_memory_model_counts_bops_and_activation_bits():
    graph = build_layer_graph(build_model("resnet20"), (3, 32, 32))
    low = MemoryModel().evaluate(graph, Plan.uniform("resnet20", graph, 4, activation_bits=4)).totals
    high = MemoryModel().evaluate(graph, Plan.uniform("resnet20", graph, 8, activation_bits=8)).totals
    assert high["bops"] == 4 * low["bops"] == graph.total_macs * 64
    assert high["peak_activation_bytes"] > low["peak_activation_bytes"]


def test_activation_quantizers_calibrate_then_quantize():
    model = build_model("resnet20")
    graph = build_layer_graph(model, (3, 32, 32))
    quantize_(model, Plan.uniform("resnet20", graph, 8, activation_bits=4))
    with pytest.raises(UserError, match="before calibration"):
        model(torch.randn(2, 3, 32, 32))
    calibrate_activations(model, [torch.randn(8, 3, 32, 32)])
    first = model.layer1[0].conv1.input_quantizer
    assert float(first.clip) > 0 and not bool(first.signed_flag)  # ReLU outputs: unsigned
    assert bool(model.conv1.input_quantizer.signed_flag)  # normalised images are signed
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cost_models_load_by_name_or_module_path_only():
    assert isinstance(get_cost_model("memory"), MemoryModel)
    assert isinstance(get_cost_model("hwmodels.memory:MemoryModel"), MemoryModel)
    with pytest.raises(UserError, match="unknown cost model"):
        get_cost_model("tpu-v9")
    with pytest.raises(UserError, match="is class OrderedDict, not a hwmodels.base.CostModel"):
        get_cost_model("collections:OrderedDict")
