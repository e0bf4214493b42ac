"""The layer graph: a model traced with torch.fx into networkx, quantizable layers annotated.

Two graphs come out of one trace. `layers` is a DiGraph over the quantizable layers (Conv2d,
grouped and depthwise included, and Linear), an edge meaning "A's output reaches B's input through
non-quantizable ops". `tensors` is the full data-flow graph of the trace in execution order; it
gives peak activation memory by liveness and the tie groups.
"""

from __future__ import annotations

import functools
import linecache
import math
import operator
import traceback
from dataclasses import dataclass
from typing import Iterable, Mapping

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import UserError

QUANTIZABLE = (nn.Conv2d, nn.Linear)
_WEIGHTED_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear)  # what a user expects quantized
LEAF_MODULES_OPTION = "leaf_modules ([model] leaf_modules in a study file, leaf_modules= in oaq_search.search)"
# Ops that make no tensor of their own: views, and the BatchNorm and activations that deployments
# fuse into the producing layer. They extend a tensor's life, not memory.
_ALIAS_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous", "size", "dim", "relu", "relu_"}
_ALIAS_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, operator.getitem,
                    torch.relu, F.relu, F.relu6, F.hardtanh, F.silu, F.hardswish}
_FUSED_MODULES = (nn.BatchNorm2d, nn.BatchNorm1d, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.Hardswish,
                  nn.Identity, nn.Dropout)
# Ops that merge tensors, so their operands must share a quantization grid in integer pipelines.
_MERGE_FUNCTIONS = {operator.add, operator.iadd, torch.add, torch.cat, torch.concat}
_MERGE_METHODS = {"add", "add_"}
TIE_RULES = ("shared_input", "merge")


@dataclass(frozen=True)
class LayerInfo:
    """What the cost models and quantizers need to know about one quantizable layer."""

    name: str
    op_type: str  # "conv2d" or "linear"
    weight_shape: tuple[int, ...]
    weight_count: int
    params: int  # weights plus bias
    macs: int  # per image
    input_shape: tuple[int, ...]  # per image, without the batch dimension
    output_shape: tuple[int, ...]
    groups: int
    input_tensor: str  # node of `tensors` this layer reads (aliases resolved)
    output_tensor: str


class LayerGraph:
    """A traced model: its quantizable layers, their data flow, activation liveness and tie groups."""

    def __init__(self, layers: nx.DiGraph, tensors: nx.DiGraph, schedule: list[str], total_params: int,
                 float_layers: list[str] | None = None):
        self.layers = layers
        self.tensors = tensors
        self.schedule = schedule
        self.total_params = total_params
        # convolutions and linear layers the quantizers do not handle (Conv1d, transposed, inside a leaf
        # module): they stay in full precision, and plans and summaries list them
        self.float_layers = float_layers or []

    @property
    def names(self) -> list[str]:
        """Quantizable layer names in execution order."""
        return list(self.layers.nodes)

    def info(self, name: str) -> LayerInfo:
        return self.layers.nodes[name]["info"]

    def infos(self) -> list[LayerInfo]:
        return [self.layers.nodes[name]["info"] for name in self.layers.nodes]

    @property
    def total_macs(self) -> int:
        return sum(info.macs for info in self.infos())

    @property
    def total_weights(self) -> int:
        return sum(info.weight_count for info in self.infos())

    def peak_activation_bytes(self, activation_bits: Mapping[str, float] | None = None, default_bits: float = 32) -> int:
        """Peak bytes of live activations over the execution order, one image.

        A tensor is live from the op that makes it to its last reader; BatchNorm and activations are
        fused into their producer. A tensor read by quantized layers is stored at the widest of
        their `activation_bits`; any other (add operands, the logits) at `default_bits`.
        """
        activation_bits = activation_bits or {}
        tensor_bits: dict[str, float] = {}
        for info in self.infos():
            bits = activation_bits.get(info.name, default_bits)
            tensor_bits[info.input_tensor] = max(tensor_bits.get(info.input_tensor, 0), bits)
        numel = nx.get_node_attributes(self.tensors, "numel")
        return max(
            math.ceil(sum(numel[n] * tensor_bits.get(n, default_bits) for n in live) / 8) for live in self._live_sets
        )

    @functools.cached_property
    def _live_sets(self) -> list[list[str]]:
        """For each step of the schedule, the tensors alive during it (inputs, output, kept skips)."""
        position = {node: index for index, node in enumerate(self.schedule)}
        end = {
            node: max((position[reader] for reader in self.tensors.successors(node)), default=len(self.schedule))
            for node in self.schedule
        }  # a graph output lives to the end
        return [[n for n in self.schedule[: step + 1] if end[n] >= step] for step in range(len(self.schedule))]

    def tie_groups(self, rules: Iterable[str] = ("shared_input",)) -> list[list[str]]:
        """Groups of layers that must share a quantizer decision, in execution order.

        `shared_input`: layers reading the same tensor (one activation quantizer serves them).
        `merge`: layers whose outputs meet at an add or concat (one output grid serves them).
        """
        rules = tuple(rules)
        unknown = set(rules) - set(TIE_RULES)
        if unknown:
            raise UserError(f"unknown tie rule {sorted(unknown)}: use {', '.join(TIE_RULES)}")
        ties = nx.Graph()
        ties.add_nodes_from(self.names)
        if "shared_input" in rules:
            readers: dict[str, list[str]] = {}
            for info in self.infos():
                readers.setdefault(info.input_tensor, []).append(info.name)
            for group in readers.values():
                nx.add_path(ties, group)
        if "merge" in rules:
            for node, data in self.tensors.nodes(data=True):
                if data["merge"]:
                    nx.add_path(ties, sorted(self._producing_layers(node)))
        order = {name: index for index, name in enumerate(self.names)}
        groups = [sorted(group, key=order.__getitem__) for group in nx.connected_components(ties)]
        return sorted(groups, key=lambda group: order[group[0]])

    def _producing_layers(self, node: str) -> set[str]:
        """Layers whose outputs reach `node`'s inputs through non-quantizable ops (adds and concats too)."""
        found: set[str] = set()
        stack = list(self.tensors.predecessors(node))
        seen = set(stack)
        while stack:
            current = stack.pop()
            data = self.tensors.nodes[current]
            if data["layer"] is not None:
                found.add(data["layer"])
                continue
            for parent in self.tensors.predecessors(current):
                if parent not in seen:
                    seen.add(parent)
                    stack.append(parent)
        return found


def build_layer_graph(model: nn.Module, input_shape: tuple[int, ...], leaf_modules: Iterable[str] = ()) -> LayerGraph:
    """Trace `model` on one input of `input_shape` (C, H, W) and build its LayerGraph.

    `leaf_modules` (qualified names) are called as a whole, not traced into: the way past a submodule
    torch.fx cannot trace. Their layers stay in full precision (`LayerGraph.float_layers`)."""
    traced = trace(model, set(leaf_modules))
    was_training = model.training
    traced.eval()
    with torch.no_grad():
        ShapeProp(traced).propagate(torch.zeros(1, *input_shape))
    model.train(was_training)
    modules = dict(traced.named_modules())

    tensors = nx.DiGraph()
    alias_of: dict[str, str] = {}
    schedule: list[str] = []
    layer_infos: list[LayerInfo] = []
    for node in traced.graph.nodes:
        if node.op in ("output", "get_attr"):
            continue
        sources = [alias_of.get(arg.name, arg.name) for arg in node.all_input_nodes]
        sources = [source for source in sources if source in tensors]
        if _is_alias(node, modules) and sources:
            alias_of[node.name] = sources[0]
            continue
        meta = node.meta.get("tensor_meta")
        shape = tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else ()
        module = modules.get(node.target) if node.op == "call_module" else None
        layer = node.target if isinstance(module, QUANTIZABLE) else None
        tensors.add_node(node.name, shape=shape, numel=math.prod(shape[1:]) if shape else 0,
                         layer=layer, merge=_is_merge(node))
        for source in sources:
            tensors.add_edge(source, node.name)
        schedule.append(node.name)
        if layer is not None:
            if any(info.name == layer for info in layer_infos):
                raise UserError(f"layer {layer} is called more than once; shared layers are not supported")
            input_shape = tuple(node.all_input_nodes[0].meta["tensor_meta"].shape[1:])  # as the layer sees it
            layer_infos.append(_layer_info(layer, module, tensors, sources[0], node.name, input_shape))

    layers = nx.DiGraph()
    for info in layer_infos:
        layers.add_node(info.name, info=info)
    float_layers = [name for name, module in model.named_modules()
                    if isinstance(module, _WEIGHTED_LAYERS) and name not in layers]
    graph = LayerGraph(layers, tensors, schedule, sum(p.numel() for p in model.parameters()), float_layers)
    if not layer_infos:
        raise UserError(f"model {type(model).__name__} has no Conv2d or Linear layer to quantize")
    for info in layer_infos:
        for producer in graph._producing_layers(info.output_tensor):
            layers.add_edge(producer, info.name)
    return graph


class _Tracer(fx.Tracer):
    """torch.fx's tracer, calling the user's `leaf_modules` as a whole."""

    def __init__(self, leaf_modules: set[str]):
        super().__init__()
        self.leaf_modules = leaf_modules

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return qualified_name in self.leaf_modules or super().is_leaf_module(module, qualified_name)


def trace(model: nn.Module, leaf_modules: set[str]) -> fx.GraphModule:
    """`model` as a torch.fx graph, `leaf_modules` called whole; a one-line error where it cannot be traced."""
    names = dict(model.named_modules())
    unknown = sorted(leaf_modules - set(names))
    if unknown:
        raise UserError(f"leaf module {unknown[0]!r} is not a submodule of {type(model).__name__}")
    try:
        return fx.GraphModule(model, _Tracer(leaf_modules).trace(model))
    except Exception as error:
        raise UserError(_untraceable(model, error)) from None


def _untraceable(model: nn.Module, error: Exception) -> str:
    """Where tracing failed, in the user's code: the submodule, file, line and call, and what to do."""
    modules = {id(module): name for name, module in model.named_modules()}
    where, submodule = "", None
    for frame, line in traceback.walk_tb(error.__traceback__):
        if "/torch/" in frame.f_code.co_filename.replace("\\", "/"):
            continue
        owner = frame.f_locals.get("self")
        if id(owner) in modules:
            submodule = modules[id(owner)]
        code = (linecache.getline(frame.f_code.co_filename, line) or "").strip()
        where = f" at {frame.f_code.co_filename}:{line} (`{code}`)"
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if submodule:  # the root module itself cannot be a leaf
        advice = f"list {submodule!r} in {LEAF_MODULES_OPTION} to call it as a whole (its layers stay in float)"
    else:
        advice = f"rewrite that call without data-dependent Python, or move it into a submodule listed in {LEAF_MODULES_OPTION}"
    return f"model {type(model).__name__} cannot be traced by torch.fx{where}: {reason}; {advice}"


def _layer_info(name: str, module: nn.Module, tensors: nx.DiGraph, input_node: str, output_node: str,
                input_shape: tuple[int, ...]) -> LayerInfo:
    output_shape = tensors.nodes[output_node]["shape"][1:]
    weight_count = module.weight.numel()
    params = weight_count + (module.bias.numel() if module.bias is not None else 0)
    if isinstance(module, nn.Conv2d):
        kernel_macs = module.in_channels // module.groups * math.prod(module.kernel_size)
        macs, op_type, groups = math.prod(output_shape) * kernel_macs, "conv2d", module.groups
    else:
        macs, op_type, groups = math.prod(output_shape[:-1]) * module.in_features * module.out_features, "linear", 1
    return LayerInfo(name, op_type, tuple(module.weight.shape), weight_count, params, macs,
                     tuple(input_shape), tuple(output_shape), groups, input_node, output_node)


def _is_alias(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _FUSED_MODULES)
    if node.op == "call_method":
        return node.target in _ALIAS_METHODS
    return node.op == "call_function" and node.target in _ALIAS_FUNCTIONS


def _is_merge(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _MERGE_METHODS
    return node.op == "call_function" and node.target in _MERGE_FUNCTIONS
