"""Cost models checked against hand-computed values on small graphs, target tables, and plugins."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.nn.functional as F
from torch import nn

import hwmodels
from hwmodels import MemoryModel, ShiftModel, TargetModel, TernaryPackedMemoryModel, get_cost_model
from oaq_search.errors import UserError
from oaq_search.graph import build_layer_graph
from oaq_search.plan import LayerPlan, Plan, packing_for


class ConvChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1, bias=False)  # 108 weights, 4*64*27 = 6912 MACs at 8x8
        self.b = nn.Conv2d(4, 2, 1)  # 8 weights + 2 biases, 2*64*4 = 512 MACs

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


@pytest.fixture
def chain():
    return build_layer_graph(ConvChain(), (3, 8, 8))


def plan(*layers):
    return Plan("chain", list(layers))


def test_memory_and_bops_by_hand(chain):
    report = MemoryModel().evaluate(chain, plan(LayerPlan("a", 3, 8), LayerPlan("b", 5, 4, per_channel=True)))
    # a: ceil(108*3/8)=41 B + scale+offset 8 B; b: ceil(8*5/8)=5 B + 2 channels x 8 B + bias 2 x 4 B
    assert report.per_layer["a"]["weight_bytes"] == 41 + 8
    assert report.per_layer["b"]["weight_bytes"] == 5 + 16 + 8
    assert report.totals["bops"] == 6912 * 3 * 8 + 512 * 5 * 4
    # activations: x (192 at 8 bits) + a's output (256 at 4 bits) = 1536 + 1024 bits, then
    # a's output + b's output (128, read by nobody, at the widest planned precision: 8) = 1024 + 1024 bits
    assert report.totals["peak_activation_bytes"] == (1536 + 1024) // 8


@pytest.mark.parametrize("model", [MemoryModel(), TernaryPackedMemoryModel(), TargetModel("bitfusion")],
                         ids=lambda model: model.name)
def test_vectorized_path_matches_the_per_plan_path(chain, model):
    bits = np.array([[2, 8], [4, 2], [8, 8]])
    acts = np.array([[8, 8], [4, 4], [8, 2]])
    many = model.evaluate_many(chain, bits, acts)
    for row in range(3):
        layers = [LayerPlan(name, int(b), int(a), code_packing=packing_for(model.code_packing, int(b)))
                  for name, b, a in zip("ab", bits[row], acts[row])]
        single = model.evaluate(chain, plan(*layers)).totals
        assert many["weight_bytes"][row] == single["weight_bytes"] and many["bops"][row] == single["bops"]


def test_ternary_packing_stores_five_codes_a_byte(chain):
    fields = MemoryModel().evaluate(chain, plan(LayerPlan("a", 2), LayerPlan("b", 8))).per_layer["a"]
    base3 = TernaryPackedMemoryModel().evaluate(chain, plan(LayerPlan("a", 2, code_packing="base3"),
                                                            LayerPlan("b", 8))).per_layer["a"]
    assert fields["weight_bytes"] == 27 + 8 and base3["weight_bytes"] == 22 + 8  # 108 codes: 108*2/8 vs ceil(108/5)
    with pytest.raises(UserError, match="ternary"):
        LayerPlan("a", 3, code_packing="base3")
    with pytest.raises(UserError, match="reads 'fields'"):  # bitfusion's 2-bit bricks read plain 2-bit fields
        TargetModel("bitfusion").evaluate(chain, plan(LayerPlan("a", 2, code_packing="base3"), LayerPlan("b", 2)))


def test_target_table_can_pack_ternary_codes(tmp_path, chain):
    text = (hwmodels.TARGETS_DIR / "mcu.toml").read_text().replace("[capabilities]\n", "[capabilities]\ncode_packing = 'base3'\n")
    (tmp_path / "mcu3.toml").write_text(text)
    target = get_cost_model(f"target:{tmp_path / 'mcu3.toml'}")
    report = target.evaluate(chain, plan(LayerPlan("a", 2, code_packing="base3"), LayerPlan("b", 4)))
    assert report.per_layer["a"]["weight_bytes"] == 22 + 8
    many = target.evaluate_many(chain, np.array([[2, 4]]))
    assert many["weight_bytes"][0] == report.totals["weight_bytes"]


def test_shift_friendliness(chain):
    totals = ShiftModel().evaluate(chain, plan(LayerPlan("a", 4, grid="pot"), LayerPlan("b", 4))).totals
    assert totals["shift_mac_share"] == pytest.approx(6912 / (6912 + 512))
    assert totals["multiply_layers"] == 1 and totals["multiply_penalty"] == 1.0
    pow2 = ShiftModel().evaluate(chain, plan(LayerPlan("a", 4), LayerPlan("b", 4, scale_format="pow2"))).totals
    assert pow2["shift_mac_share"] == pytest.approx(512 / 7424)


def test_bitfusion_latency_grows_with_bricks(chain):
    bitfusion = TargetModel("bitfusion")
    cheap = bitfusion.evaluate(chain, plan(LayerPlan("a", 2, 2), LayerPlan("b", 2, 2))).totals
    dear = bitfusion.evaluate(chain, plan(LayerPlan("a", 8, 8), LayerPlan("b", 8, 8))).totals
    # by hand: (6912 + 512) MACs at 4.096e12 vs 0.256e12 MAC/s, plus 1 us per layer
    assert cheap["latency_s"] == pytest.approx(7424 / 4.096e12 + 2e-6)
    assert dear["latency_s"] == pytest.approx(7424 / 0.256e12 + 2e-6)
    assert dear["energy_j"] == pytest.approx(16 * cheap["energy_j"])


def test_uncovered_bit_pair_uses_the_next_wider_kernel(chain):
    gpu = TargetModel("gpu")
    mixed = gpu.evaluate(chain, plan(LayerPlan("a", 4, 8), LayerPlan("b", 4, 8))).totals
    eight = gpu.evaluate(chain, plan(LayerPlan("a", 8, 8), LayerPlan("b", 8, 8))).totals
    assert mixed["latency_s"] == pytest.approx(eight["latency_s"])  # w4a8 runs on the INT8 path


def test_illegal_plan_names_layer_and_allowed_bits(chain):
    with pytest.raises(UserError, match=r"layer a \(conv2d\) uses weight_bits 3.*allowed \[4, 8\]"):
        TargetModel("gpu").evaluate(chain, plan(LayerPlan("a", 3, 8), LayerPlan("b", 4, 8)))
    with pytest.raises(UserError, match=r"activation_bits 4.*allowed \[8\]"):
        TargetModel("mcu").evaluate(chain, plan(LayerPlan("a", 4, 4), LayerPlan("b", 4, 8)))


@pytest.mark.parametrize("text, pattern", [
    ("[target]\nname='x'\n", r"missing key 'capabilities'"),
    ("[target]\nname='x'\n[capabilities]\nweight_bits = 4\n[rates]\n", r"'capabilities\.weight_bits' must be a table"),
    ("[target]\nname='x'\n[capabilities]\nweight_bits={conv2d=[4],linear=[4]}\nactivation_bits={conv2d=[8],linear=[99]}\n[rates]\n",
     r"'capabilities\.activation_bits\.linear' must list bit-widths"),
    ("[target]\nname='x'\n[capabilities]\nweight_bits={conv2d=[4],linear=[4]}\nactivation_bits={conv2d=[8],linear=[8]}\n"
     "[rates]\nconv2d={ eight = { macs_per_s = 1 } }\nlinear={}\n", r"'rates\.conv2d\.eight' must be named w<bits>a<bits>"),
    ("[target]\nname='x'\n[capabilities]\nweight_bits={conv2d=[4],linear=[4]}\nactivation_bits={conv2d=[8],linear=[8]}\n"
     "[rates]\nconv2d={ w4a8 = { speed = 1 } }\nlinear={}\n", r"missing key 'rates\.conv2d\.w4a8\.macs_per_s'"),
    ("[target]\nname='x'\n[capabilities]\nweight_bits={conv2d=[4],linear=[4]}\nactivation_bits={conv2d=[8],linear=[8]}\n"
     "code_packing='nibbles'\n[rates]\n", r"'capabilities\.code_packing' must be one of fields, base3"),
    ("not toml [", "is not valid TOML"),
])
def test_malformed_target_table_names_file_key_and_expectation(tmp_path, text, pattern):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=pattern) as error:
        hwmodels.load_target(path)
    assert "bad.toml" in str(error.value)


def test_local_cpu_table_from_real_kernels(tmp_path, chain):
    from hwmodels.measure import measure_local_cpu

    table = measure_local_cpu(ConvChain().eval(), chain, (3, 8, 8), repeats=5)
    import tomli_w

    (tmp_path / "local.toml").write_text(tomli_w.dumps(table))
    model = get_cost_model(f"target:{tmp_path / 'local.toml'}")
    int8 = model.evaluate(chain, plan(LayerPlan("a", 4, 8), LayerPlan("b", 4, 8))).totals["latency_s"]
    floats = model.evaluate(chain, plan(LayerPlan("a", 4), LayerPlan("b", 4))).totals["latency_s"]
    assert int8 > 0 and floats > 0 and int8 != floats  # two different real kernels were timed


def test_onnxruntime_table_from_deployed_layers(tmp_path):
    """Each layer exported as `deploy` writes it, timed in ONNX Runtime with an 8-bit and a float input."""
    import tomli_w

    from hwmodels.measure_onnxruntime import measure_onnxruntime

    chain = build_layer_graph(ConvChain(), (3, 32, 32))
    table = measure_onnxruntime(ConvChain().eval(), chain, (3, 32, 32), batch=4, repeats=5)
    assert {(e["in_channels"], e["activation_bits"]) for e in table["layers"]} == {
        (channels, bits) for channels in (3, 4) for bits in [*range(2, 9), 32]}
    assert 0 <= table["target"]["switch_s_per_value"] < 1e-3  # fitted on a third model: a 8-bit, b float
    for channels in (3, 4):  # below 8 bits one time with the Clip priced in (a fourth model, all 4-bit inputs)
        times = {e["activation_bits"]: e["latency_s"] for e in table["layers"]
                 if e["in_channels"] == channels and e["weight_bits"] == 4}
        assert len({times[bits] for bits in range(2, 8)}) == 1 and times[4] >= times[8] > 0
    (tmp_path / "ort.toml").write_text(tomli_w.dumps(table))
    model = get_cost_model(f"target:{tmp_path / 'ort.toml'}")
    int8 = model.evaluate(chain, plan(LayerPlan("a", 4, 4), LayerPlan("b", 4, 8))).totals["latency_s"]
    floats = model.evaluate(chain, plan(LayerPlan("a", 4), LayerPlan("b", 4))).totals["latency_s"]
    assert int8 > 0 and floats > 0 and int8 != floats  # two different deployed kernels were timed


def test_a_layer_shaped_like_its_input_is_timed_twice_in_a_row(tmp_path):
    """Inside a model a layer pays no layout change or quantize call at the model's ends: such a layer is
    also exported twice in a row (the second with weights of its own), and its time is the second's."""
    import onnx

    from hwmodels.measure_onnxruntime import _in_chain, _single_layer_models

    layer = nn.Conv2d(4, 4, 3, padding=1)
    info = build_layer_graph(nn.Sequential(layer), (4, 8, 8)).info("0")
    models = _single_layer_models(layer, info, 2, tmp_path)
    assert set(models) == {"int8", "float", "int8 twice", "float twice"}
    convs = [n for n in onnx.load(str(models["float twice"])).graph.node if n.op_type == "Conv"]
    assert len(convs) == 2 and len({n.input[1] for n in convs}) == 2
    seconds = {"0.int8": 3.0, "0.int8 twice": 4.0, "0.call": 1.0, "1.int8": 3.0, "1.call": 1.0}
    assert _in_chain(seconds, "0", "int8") == 1.0 and _in_chain(seconds, "1", "int8") == 2.0


def test_a_switch_between_integer_and_float_kernels_costs_the_next_layers_input_values(chain, tmp_path):
    """ONNX Runtime's integer kernels run NHWC and its float ones NCHWc: a measured table charges each
    switch `switch_s_per_value` per input value of the layer after it (b reads 4 x 8 x 8 values)."""
    text = ('[target]\nname = "runtime"\ndefault_activation_bits = 32\nswitch_s_per_value = {switch}\n'
            '[capabilities]\nweight_bits = {{ conv2d = [8], linear = [8] }}\n'
            'activation_bits = {{ conv2d = [8, 32], linear = [8, 32] }}\n'
            '[rates]\nconv2d = {{ w8a8 = {{ macs_per_s = 2e9 }}, w8a32 = {{ macs_per_s = 1e9 }} }}\n'
            'linear = {{ w8a8 = {{ macs_per_s = 2e9 }}, w8a32 = {{ macs_per_s = 1e9 }} }}\n')
    (tmp_path / "switching.toml").write_text(text.format(switch=1e-9))
    (tmp_path / "plain.toml").write_text(text.format(switch=0))
    latency = {name: {label: TargetModel(tmp_path / f"{name}.toml").evaluate(chain, plan(*layers)).totals["latency_s"]
                      for label, layers in {"same": (LayerPlan("a", 8, 8), LayerPlan("b", 8, 8)),
                                            "switched": (LayerPlan("a", 8, 8), LayerPlan("b", 8))}.items()}
               for name in ("switching", "plain")}
    assert latency["switching"]["same"] == pytest.approx(latency["plain"]["same"])
    assert latency["switching"]["switched"] - latency["plain"]["switched"] == pytest.approx(4 * 8 * 8 * 1e-9)
    with pytest.raises(UserError, match="switch_s_per_value' must be a finite number, zero or more"):
        (tmp_path / "bad.toml").write_text(text.format(switch=-1))
        TargetModel(tmp_path / "bad.toml")


def test_example_plugin_installs_and_is_found_by_name(tmp_path):
    source, target = tmp_path / "npu_plugin", tmp_path / "site"
    shutil.copytree(Path(__file__).resolve().parents[1] / "examples" / "npu_plugin", source)  # builds stay out of the repo
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True)
    code = ("import sys; sys.path.insert(0, %r); import hwmodels; m = hwmodels.get_cost_model('example-npu'); "
            "print(type(m).__name__, 'example-npu' in hwmodels.available())" % str(target))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(target), **__import__("os").environ})
    assert out.stdout.split() == ["ExampleNPU", "True"], out.stderr


def test_target_fingerprint_is_the_same_in_every_process():
    """A resumed study compares fingerprints across processes; hash() would differ run to run."""
    code = "import hwmodels; print(hwmodels.TargetModel('bitfusion').fingerprint())"
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(runs) == 1 and TargetModel("bitfusion").fingerprint() in runs.pop()
