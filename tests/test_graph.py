import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oaq_search.errors import UserError
from oaq_search.graph import build_layer_graph
from oaq_search.models import build_model, model_spec


def graph_of(name):
    return build_layer_graph(build_model(name), model_spec(name).input_shape)


@pytest.mark.parametrize("name, params, macs, weights", [
    ("resnet20", 0.27e6, 41e6, 268_336),
    ("resnet56", 0.85e6, 126e6, 848_944),
    ("tv_resnet18", 11.7e6, 1.8e9, None),
])
def test_known_parameter_and_mac_counts(name, params, macs, weights):
    graph = graph_of(name)
    assert graph.total_params == pytest.approx(params, rel=0.02)
    assert graph.total_macs == pytest.approx(macs, rel=0.02)
    if weights is not None:  # benchmark-protocol.md reference counts
        assert graph.total_weights == weights
    last = graph.info(graph.names[-1])
    assert last.op_type == "linear" and len(last.input_shape) == 1  # after flatten, as the layer sees it


@pytest.mark.parametrize("name", ["resnet32", "resnet44", "resnet110", "densenet100", "tv_resnet50", "tv_mobilenet_v2"])
def test_every_registered_model_traces(name):
    graph = graph_of(name)
    assert graph.names[0] in ("conv1", "features.0.0")
    assert graph.peak_activation_bytes() > 0
    assert all(graph.info(n).macs > 0 for n in graph.names)


def test_depthwise_layers_carry_groups_and_their_macs():
    graph = graph_of("tv_mobilenet_v2")
    info = graph.info("features.1.conv.0.0")  # 3x3 depthwise, 32 channels at 112x112
    assert info.groups == 32
    assert info.macs == 32 * 112 * 112 * 9


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x))) + x


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.left = nn.Conv2d(4, 2, 1)
        self.right = nn.Conv2d(4, 2, 3, padding=1)
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.head(torch.cat([self.left(x), self.right(x)], 1))


def test_chain_peak_activation_by_hand():
    graph = build_layer_graph(Chain(), (3, 8, 8))
    # x(192) -> a(256, relu fused) -> b(128): the peak is x and a alive together = 448 floats.
    assert graph.peak_activation_bytes() == 448 * 4
    # x stored at 8 bits (read by a), a's output at 4 bits (read by b), b's output float32:
    # step a: 192*8 + 256*4 = 2560 bits; step b: 256*4 + 128*32 = 5120 bits = 640 bytes, the peak.
    assert graph.peak_activation_bytes({"a": 8, "b": 4}) == 640
    assert list(graph.layers.edges) == [("a", "b")]
    assert graph.info("a").macs == 4 * 64 * 27


def test_long_lived_skip_tensor_raises_the_peak():
    graph = build_layer_graph(Residual(), (4, 8, 8))
    # x (256) stays alive across conv1 and conv2 for the add: three 256-float tensors at once.
    assert graph.peak_activation_bytes() == 3 * 256 * 4
    assert graph.tie_groups() == [["conv1"], ["conv2"]]


def test_tie_groups_for_shared_inputs_and_concatenation():
    graph = build_layer_graph(Concat(), (4, 8, 8))
    assert graph.tie_groups(["shared_input"]) == [["left", "right"], ["head"]]
    assert graph.tie_groups(["merge"]) == [["left", "right"], ["head"]]
    assert set(graph.layers.edges) == {("left", "head"), ("right", "head")}
    with pytest.raises(UserError, match="unknown tie rule"):
        graph.tie_groups(["nonsense"])


def test_torchvision_downsample_shares_the_block_input():
    groups = graph_of("tv_resnet18").tie_groups()
    assert ["layer2.0.conv1", "layer2.0.downsample.0"] in groups


def test_residual_stream_ties_under_the_merge_rule():
    merged = graph_of("resnet20").tie_groups(["merge"])
    assert ["conv1"] + [f"layer{s}.{b}.conv2" for s in (1, 2, 3) for b in range(3)] in merged


def test_untraceable_model_is_a_user_error():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x

    with pytest.raises(UserError, match="cannot be traced"):
        build_layer_graph(Dynamic(), (3, 4, 4))
