"""Channel-dependency analysis: which channels of an ONNX graph must be removed together.

Every output channel of a prunable layer (a Conv with ``group=1``, a Gemm or a MatMul
with a constant weight) is a *unit*. The analysis walks the graph in order and
records, for every tensor that carries units, which unit sits at each position of
its channel axis (`ChannelMap`):

- element-wise ops, pooling, BatchNormalization and per-channel constants pass
  the map through (their constants are sliced at surgery);
- residual Add/Mul/Sum of two mapped tensors *couple* the units at equal
  positions: they can only go together;
- Concat along the channels concatenates maps, Split slices them;
- a depthwise Conv repeats its input's units (each output channel belongs to one
  input channel);
- Flatten, or a Reshape that merges the channels with the spatial axes, repeats
  each unit once per spatial position (the Gemm after it loses whole blocks);
- a Reshape that splits the channels into ``(g, C/g)`` and the Transpose and
  Reshape of a channel shuffle keep a 2-D map; its columns are coupled so that
  every group keeps the same count;
- a Conv, Gemm or MatMul reading a mapped tensor ends it (its weight is sliced).

Coupled units form *classes* (connected components of a networkx graph); a class is
removed whole or not at all. A class is blocked, with the reason recorded, when
any of its units reaches a model output, an op the analysis does not understand,
or a tensor whose channels cannot be removed: so no removal can make an invalid
graph.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import networkx as nx
import numpy as np
import onnx_ir as ir

from compressor.ir import constant_array as _const
from compressor.pruning.node_facts import attr, dims, ints, opset, reshaped, same_dim, sliced_axes, split_sizes
from compressor.pruning.node_facts import axes as axes_of

STANDARD_DOMAINS = ("", "ai.onnx")
# Ops that act on every element alone: the channel map passes through unchanged.
UNARY = frozenset(
    [
        "Relu",
        "LeakyRelu",
        "Sigmoid",
        "Tanh",
        "HardSigmoid",
        "HardSwish",
        "Elu",
        "Selu",
        "Celu",
        "Gelu",
        "Erf",
        "Exp",
        "Log",
        "Neg",
        "Abs",
        "Sqrt",
        "Reciprocal",
        "Softplus",
        "Softsign",
        "Mish",
        "Identity",
        "Dropout",
        "Cast",
        "Floor",
        "Ceil",
        "Round",
        "Sign",
        "Sin",
        "Cos",
        "Not",
        "IsNaN",
        "IsInf",
    ]
)
# Element-wise ops with several inputs, broadcasting (constants per channel are sliced).
ELEMENTWISE = frozenset(
    [
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Pow",
        "Max",
        "Min",
        "Sum",
        "Mean",
        "PRelu",
        "Clip",
        "Where",
        "Equal",
        "Less",
        "Greater",
        "And",
        "Or",
    ]
)
POOLING = frozenset(["MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"])
PER_CHANNEL_NORMS = frozenset(("BatchNormalization", "InstanceNormalization"))
REDUCTIONS = frozenset(["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2"])


@dataclass(frozen=True)
class ChannelMap:
    """The units at each channel position of one tensor.

    ``ids`` is 1-D over ``axis``, or 2-D over ``axis`` and ``axis + 1`` once a Reshape
    split the channels into groups (a channel shuffle). A unit may appear at many
    positions (after Flatten, once per spatial position).
    """

    axis: int
    ids: np.ndarray

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])


@dataclass(frozen=True)
class Source:
    """Where a unit is made: output channel ``channel`` of the layer ``node``."""

    node: ir.Node
    channel: int


class ChannelGraph:
    """The result of the analysis: channel maps, the units' classes and why blocked ones are."""

    __slots__ = ("_class_of", "blocked", "classes", "maps", "sources")

    def __init__(
        self,
        maps: dict[ir.Value, ChannelMap],
        sources: list[Source],
        couplings: nx.Graph,
        unit_blocks: dict[int, str],
    ) -> None:
        self.maps = maps
        self.sources = sources
        components = sorted((sorted(c) for c in nx.connected_components(couplings)), key=lambda c: c[0])
        self.classes: list[tuple[int, ...]] = [tuple(c) for c in components]
        self._class_of = np.empty(len(sources), dtype=np.int64)
        for index, members in enumerate(self.classes):
            self._class_of[list(members)] = index
        self.blocked: dict[int, str] = {}  # class -> the first reason found
        for unit, reason in unit_blocks.items():
            self.blocked.setdefault(int(self._class_of[unit]), reason)

    def class_of(self, units: np.ndarray) -> np.ndarray:
        """The class of each unit id in ``units`` (any shape)."""
        return self._class_of[units]

    @property
    def prunable(self) -> list[int]:
        """Classes that may be removed."""
        return [c for c in range(len(self.classes)) if c not in self.blocked]

    def kept_mask(self, value: ir.Value, removed: np.ndarray) -> np.ndarray:
        """Per position of ``value``'s channel map: whether it stays (``removed`` is a bool per class)."""
        return ~removed[self._class_of[self.maps[value].ids]]


def analyze(graph: ir.Graph) -> ChannelGraph:
    """The channel dependencies of ``graph`` (read only; shapes must be inferred)."""
    return _Propagation(graph).run()


class _Propagation:
    """One forward walk over the graph, building channel maps and couplings."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.maps: dict[ir.Value, ChannelMap] = {}
        self.sources: list[Source] = []
        self.couplings = nx.Graph()
        self.blocks: dict[int, str] = {}
        self.known: dict[ir.Value, list[int | str]] = {}  # dims the analysis worked out where inference did not

    def _dims(self, value: ir.Value) -> list[int | str] | None:
        return self.known.get(value) or dims(value)

    def _rank(self, value: ir.Value) -> int | None:
        dims = self._dims(value)
        return None if dims is None else len(dims)

    def run(self) -> ChannelGraph:
        for node in self.graph:
            mapped = [v for v in node.inputs if v is not None and v in self.maps]
            if node.domain not in STANDARD_DOMAINS:
                self._block_all(mapped, f"{node.op_type} ({node.domain}) at {node.name!r} is not understood")
                continue
            reason = self._visit(node, mapped)
            if reason is not None:
                self._block_all(mapped, f"{node.op_type} {node.name!r}: {reason}")
                for output in node.outputs:
                    self.maps.pop(output, None)
        for value, channel_map in self.maps.items():  # read inside an If/Loop/Scan body: not ours to change
            inner = next((use.node for use in value.uses() if use.node.graph is not self.graph), None)
            if inner is not None:
                self._block(channel_map.ids, f"{inner.op_type} {inner.name!r} in a subgraph reads {value.name!r}")
        for output in self.graph.outputs:
            if output in self.maps:
                self._block(self.maps[output].ids, f"model output {output.name!r} keeps all its channels")
        return ChannelGraph(self.maps, self.sources, self.couplings, self.blocks)

    # -- helpers ---------------------------------------------------------------------------------

    def _fresh(self, node: ir.Node, count: int) -> np.ndarray:
        start = len(self.sources)
        self.sources.extend(Source(node, c) for c in range(count))
        self.couplings.add_nodes_from(range(start, start + count))
        return np.arange(start, start + count)

    def _block(self, ids: np.ndarray, reason: str) -> None:
        for unit in np.unique(ids):
            self.blocks.setdefault(int(unit), reason)

    def _block_all(self, values: Iterable[ir.Value], reason: str) -> None:
        for value in values:
            self._block(self.maps[value].ids, reason)

    def _couple(self, a: np.ndarray, b: np.ndarray) -> None:
        self.couplings.add_edges_from(zip(a.ravel().tolist(), b.ravel().tolist(), strict=False))

    # -- the walk --------------------------------------------------------------------------------

    def _visit(self, node: ir.Node, mapped: list[ir.Value]) -> str | None:
        """Propagate through ``node``; return why it blocks its mapped inputs, or None."""
        op = node.op_type
        if op in ("Conv", "Gemm", "MatMul"):
            return self._layer(node, mapped)
        if not mapped:
            return None
        if op in UNARY or op in POOLING or op in PER_CHANNEL_NORMS:
            return self._pass_through(node, mapped)
        if op in ELEMENTWISE:
            return self._elementwise(node)
        if op == "Concat":
            return self._concat(node)
        if op == "Split":
            return self._split(node)
        if op == "Transpose":
            return self._transpose(node)
        if op in ("Reshape", "Flatten"):
            return self._reshape(node)
        if op in REDUCTIONS or op in ("Softmax", "LogSoftmax", "Pad", "Squeeze", "Unsqueeze", "Resize", "Slice"):
            return self._axis_op(node)
        return "not understood by the pruning analysis"

    def _layer(self, node: ir.Node, mapped: list[ir.Value]) -> str | None:
        weight = _const(node.inputs[1]) if len(node.inputs) > 1 else None
        x = node.inputs[0]
        if weight is None:
            return "its weight is not a constant"
        if any(v is not x for v in mapped):
            return "reads mapped channels as a weight"
        if node.op_type == "Conv":
            return self._conv(node, weight)
        if node.op_type == "Gemm":
            if attr(node, "transA", 0) or weight.ndim != 2:
                return "Gemm with transA is not pruned"
            outputs = weight.shape[0] if attr(node, "transB", 0) else weight.shape[1]
        else:
            if weight.ndim != 2:
                return "MatMul with a weight that is not 2-D"
            outputs = weight.shape[1]
        if x in self.maps and not self._is_last_axis(x):
            return "its input's channels are not on the last axis"
        rank = self._rank(node.outputs[0])
        if rank is None:
            return "output rank unknown"
        self.maps[node.outputs[0]] = ChannelMap(rank - 1, self._fresh(node, outputs))
        return None

    def _is_last_axis(self, value: ir.Value) -> bool:
        channel_map, rank = self.maps[value], self._rank(value)
        return channel_map.ids.ndim == 1 and rank is not None and channel_map.axis == rank - 1

    def _conv(self, node: ir.Node, weight: np.ndarray) -> str | None:
        x, group = node.inputs[0], attr(node, "group", 1)
        if x in self.maps and (self.maps[x].axis != 1 or self.maps[x].ids.ndim != 1):
            return "its input's channels are not on axis 1"
        out = node.outputs[0]
        if group == 1:
            self.maps[out] = ChannelMap(1, self._fresh(node, weight.shape[0]))
            return None
        if weight.shape[1] != 1:
            ids = self._fresh(node, weight.shape[0])
            self._block(ids, f"grouped Conv {node.name!r} (group={group}) is not pruned")
            self.maps[out] = ChannelMap(1, ids)
            return f"grouped Conv (group={group}) is not pruned"
        multiplier = weight.shape[0] // group
        if x in self.maps:  # depthwise: output channel j belongs to input channel j // multiplier
            self.maps[out] = ChannelMap(1, np.repeat(self.maps[x].ids, multiplier))
            return None
        ids = self._fresh(node, weight.shape[0])
        self._block(ids, f"depthwise Conv {node.name!r} reads channels that cannot be removed")
        self.maps[out] = ChannelMap(1, ids)
        return None

    def _pass_through(self, node: ir.Node, mapped: list[ir.Value]) -> str | None:
        x = node.inputs[0]
        if x not in self.maps or any(v is not x for v in mapped):
            return "mapped channels on a parameter input"
        if node.op_type in PER_CHANNEL_NORMS or node.op_type in POOLING:
            if self.maps[x].axis != 1 or self.maps[x].ids.ndim != 1:
                return "channels are not on axis 1"
            if any(_const(v) is None for v in node.inputs[1:] if v is not None):
                return "its parameters are not constants"
        self.maps[node.outputs[0]] = self.maps[x]
        if x in self.known and node.op_type not in POOLING:
            self.known[node.outputs[0]] = self.known[x]
        for extra in node.outputs[1:]:
            if extra.uses() or extra.is_graph_output():
                return "uses an output beyond the first"
        return None

    def _elementwise(self, node: ir.Node) -> str | None:
        out_rank = self._rank(node.outputs[0])
        if out_rank is None:
            return "output rank unknown"
        reference: ChannelMap | None = None
        for value in node.inputs:
            if value is None or value not in self.maps:
                continue
            channel_map = self.maps[value]
            rank = self._rank(value)
            if rank is None:
                return "input rank unknown"
            shifted = ChannelMap(channel_map.axis + out_rank - rank, channel_map.ids)
            if reference is None:
                reference = shifted
            elif reference.axis != shifted.axis or reference.ids.shape != shifted.ids.shape:
                return "adds tensors whose channels do not line up"
            else:
                self._couple(reference.ids, shifted.ids)
        assert reference is not None
        span = range(reference.axis, reference.axis + reference.ids.ndim)
        for value in node.inputs:
            if value is None or value in self.maps:
                continue
            dims = self._dims(value)
            if dims is None:
                return f"input {value.name!r} has an unknown shape"
            offset = out_rank - len(dims)
            for position, axis in enumerate(span):
                size = dims[axis - offset] if axis - offset >= 0 else 1
                if size == 1:
                    continue
                if _const(value) is None or reference.ids.ndim != 1:
                    return f"input {value.name!r} is not constant per channel"
                if size != reference.ids.shape[position]:
                    return f"input {value.name!r} does not broadcast over the channels"
        self.maps[node.outputs[0]] = reference
        return None

    def _concat(self, node: ir.Node) -> str | None:
        rank = self._rank(node.outputs[0])
        if rank is None:
            return "output rank unknown"
        axis = attr(node, "axis", 0) % rank
        maps = [self.maps.get(v) for v in node.inputs]
        along = [m for m in maps if m is not None and m.axis <= axis < m.axis + m.ids.ndim]
        if not along:  # concatenated along another axis: the inputs' channels line up
            first = next(m for m in maps if m is not None)
            if any(m is None or m.axis != first.axis or m.ids.shape != first.ids.shape for m in maps):
                return "joins, along another axis, inputs whose channels do not line up"
            for other in maps[1:]:
                self._couple(first.ids, other.ids)
            self.maps[node.outputs[0]] = first
            return None
        parts = []
        for value, channel_map in zip(node.inputs, maps, strict=False):
            if channel_map is not None:
                if channel_map.axis != axis or channel_map.ids.ndim != 1:
                    return "concatenates inputs whose channels are on different axes"
                parts.append(channel_map.ids)
                continue
            dims = self._dims(value)
            if dims is None or not isinstance(dims[axis], int):
                return f"input {value.name!r} has an unknown channel count"
            parts.append(self._fresh(node, dims[axis]))
            self._block(parts[-1], f"Concat {node.name!r}: input {value.name!r} has channels that cannot be removed")
        self.maps[node.outputs[0]] = ChannelMap(axis, np.concatenate(parts))
        return None

    def _split(self, node: ir.Node) -> str | None:
        x = node.inputs[0]
        channel_map, rank = self.maps[x], self._rank(x)
        if rank is None or channel_map.ids.ndim != 1:
            return "input rank unknown"
        axis = attr(node, "axis", 0) % rank
        if axis != channel_map.axis:
            for output in node.outputs:
                self.maps[output] = channel_map
            return None
        sizes = split_sizes(node, channel_map.length)
        if sizes is None:
            return "its split sizes are not constants"
        bounds = np.cumsum([0, *sizes])
        for output, start, stop in zip(node.outputs, bounds[:-1], bounds[1:], strict=False):
            self.maps[output] = ChannelMap(axis, channel_map.ids[start:stop])
        return None

    def _transpose(self, node: ir.Node) -> str | None:
        x = node.inputs[0]
        channel_map = self.maps[x]
        perm = ints(node, "perm") or list(range(self._rank(x) or 0))[::-1]
        if not perm:
            return "input rank unknown"
        dims = self._dims(x)
        if dims is not None and len(dims) == len(perm):
            self.known[node.outputs[0]] = [dims[p] for p in perm]
        if channel_map.ids.ndim == 1:
            self.maps[node.outputs[0]] = ChannelMap(perm.index(channel_map.axis), channel_map.ids)
            return None
        first, second = perm.index(channel_map.axis), perm.index(channel_map.axis + 1)
        if abs(first - second) != 1:
            return "moves the two halves of a channel split apart"
        ids = channel_map.ids if first < second else channel_map.ids.T
        self.maps[node.outputs[0]] = ChannelMap(min(first, second), ids)
        return None

    def _reshape(self, node: ir.Node) -> str | None:
        x, out = node.inputs[0], node.outputs[0]
        channel_map, dims = self.maps[x], self._dims(x)
        out_dims = None if dims is None else reshaped(node, dims)
        if out_dims is None:
            return "shapes unknown"
        self.known[out] = out_dims
        axis, width = channel_map.axis, channel_map.ids.ndim
        if len(out_dims) <= axis or not all(
            same_dim(a, b) for a, b in zip(dims[:axis], out_dims[:axis], strict=False)
        ):
            return "reshapes the axes before the channels"
        if node.op_type == "Reshape" and _const(node.inputs[1]) is None:
            return "its target shape is not a constant"
        if node.op_type == "Flatten" and attr(node, "axis", 1) % len(dims) != axis:
            return "flattens at another axis than the channels"
        inner = dims[axis:]
        if not all(isinstance(d, int) for d in inner) or not all(isinstance(d, int) for d in out_dims[axis:]):
            return "channel or spatial sizes are symbolic"
        rest, out_rest = inner[width:], out_dims[axis:]
        channels = int(np.prod(inner[:width]))
        if out_rest and out_rest[0] == channels * int(np.prod(rest)) and len(out_rest) == 1:  # merge: Flatten
            self.maps[out] = ChannelMap(axis, np.repeat(channel_map.ids.reshape(-1), int(np.prod(rest))))
            return None
        if width == 2 and len(out_rest) >= 1 and out_rest[0] == channels and out_rest[1:] == rest:
            self.maps[out] = ChannelMap(axis, channel_map.ids.reshape(-1))
            return None
        if width == 1 and len(out_rest) >= 2 and out_rest[0] * out_rest[1] == channels and out_rest[2:] == rest:
            groups = out_rest[0]
            ids = channel_map.ids.reshape(groups, -1)
            for row in ids[1:]:
                self._couple(ids[0], row)
            self.maps[out] = ChannelMap(axis, ids)
            return None
        if width == 1 and out_rest == inner:
            self.maps[out] = channel_map
            return None
        return "reshapes the channels in a way the analysis does not follow"

    def _axis_op(self, node: ir.Node) -> str | None:
        x, out = node.inputs[0], node.outputs[0]
        channel_map, rank, out_rank = self.maps[x], self._rank(x), self._rank(out)
        if rank is None or out_rank is None:
            return "rank unknown"
        span = set(range(channel_map.axis, channel_map.axis + channel_map.ids.ndim))
        op, axis = node.op_type, channel_map.axis
        if op in ("Softmax", "LogSoftmax"):
            if attr(node, "axis", -1 if opset(node) >= 13 else 1) % rank in span:
                return "normalizes across the channels"
        elif op == "Pad":
            pads = _const(node.inputs[1]) if len(node.inputs) > 1 else np.array(ints(node, "pads") or [])
            if pads is None or len(pads) != 2 * rank or len(node.inputs) > 3:
                return "its pads are not constants over every axis"
            if any(pads[a] or pads[a + rank] for a in span):
                return "pads the channel axis"
        elif op == "Resize":
            scales = _const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
            if (len(node.inputs) > 3 and node.inputs[3] is not None) or scales is None or len(scales) != rank:
                return "resizes to given sizes (or its scales are not constants)"
            if any(scales[a] != 1 for a in span):
                return "resizes the channel axis"
        elif op == "Slice":
            if sliced_axes(node, rank) is None:
                return "its axes are not constants"
            if sliced_axes(node, rank) & span:
                return "slices the channel axis"
        else:
            axes = axes_of(node)
            if axes is None:
                return "reduces every axis" if op in REDUCTIONS else "its axes are not constants"
            axes = {a % (out_rank if op == "Unsqueeze" else rank) for a in axes}
            if op == "Unsqueeze":  # the axes index the output
                for a in sorted(axes):
                    axis += a <= axis
            elif axes & span:
                return "reduces or squeezes the channel axis"
            elif op == "Squeeze" or not attr(node, "keepdims", 1):
                axis -= sum(a < axis for a in axes)
        self.maps[out] = ChannelMap(axis, channel_map.ids)
        return None
