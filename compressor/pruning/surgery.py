"""Channel surgery: remove whole channel classes from a graph, rewriting weights, attributes and shapes.

`remove_channels` is the physical removal. `zero_consumers` is its numerical twin
for tests and masks: it leaves every shape alone and zeroes the weights that read
the removed channels, so the original graph then computes what the pruned one does.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from compressor.ir import UniqueNames, add_initializer
from compressor.ir import constant_array as _const
from compressor.pruning.channels import ELEMENTWISE, PER_CHANNEL_NORMS, ChannelGraph, ChannelMap
from compressor.pruning.node_facts import opset as _opset
from compressor.pruning.node_facts import rank as _rank


class _Rewrite:
    """One removal over one graph: the kept positions of every mapped tensor and the edits they imply."""

    __slots__ = ("analysis", "graph", "names", "removed", "zero_only")

    def __init__(self, graph: ir.Graph, analysis: ChannelGraph, removed: np.ndarray, zero_only: bool) -> None:
        self.graph, self.analysis, self.removed, self.zero_only = graph, analysis, removed, zero_only
        self.names = UniqueNames(graph)

    def keep(self, value: ir.Value, along: int = 0) -> np.ndarray | None:
        """Kept positions of ``value``'s channels along the ``along``-th axis of its map (None: not mapped)."""
        if value is None or value not in self.analysis.maps:
            return None
        mask = self.analysis.kept_mask(value, self.removed)
        if mask.ndim == 1:
            return mask
        return mask.any(axis=1 - along)  # classes fill whole rows or columns of a channel split

    def slice_input(self, node: ir.Node, index: int, axis: int, keep: np.ndarray | None) -> None:
        """Replace ``node``'s constant input ``index`` by its slice along ``axis`` (kept where ``keep``)."""
        value = node.inputs[index]
        array = _const(value)
        if keep is None or keep.all() or array is None:
            return
        if self.zero_only:
            array = array.copy()
            array[(slice(None),) * axis + (~keep,)] = 0
            self.replace(node, index, array)
            return
        self.replace(node, index, np.compress(keep, array, axis=axis))

    def replace(self, node: ir.Node, index: int, array: np.ndarray) -> None:
        old = node.inputs[index]
        node.replace_input_with(index, add_initializer(self.graph, f"{old.name}_pruned", array, self.names))
        if not old.uses() and not old.is_graph_input() and not old.is_graph_output() and old.name:
            self.graph.initializers.pop(old.name, None)


def remove_channels(graph: ir.Graph, analysis: ChannelGraph, removed: np.ndarray) -> int:
    """Remove the channel classes where ``removed`` (a bool per class) is set; return the layer channels removed.

    ``analysis`` must be of ``graph`` as it is now. Blocked classes must not be removed.
    """
    _check(analysis, removed)
    if not removed.any():
        return 0
    rewrite = _Rewrite(graph, analysis, removed, zero_only=False)
    for node in list(graph):
        _rewrite_node(rewrite, node)
    for value, channel_map in analysis.maps.items():
        _resize(value, channel_map, analysis.kept_mask(value, removed))
    return int(removed[analysis.class_of(np.arange(len(analysis.sources)))].sum())


def zero_consumers(graph: ir.Graph, analysis: ChannelGraph, removed: np.ndarray) -> None:
    """Zero the weights of the layers that read the removed classes (shapes unchanged), in place."""
    _check(analysis, removed)
    rewrite = _Rewrite(graph, analysis, removed, zero_only=True)
    for node in list(graph):
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            _rewrite_node(rewrite, node)


def _check(analysis: ChannelGraph, removed: np.ndarray) -> None:
    if removed.shape != (len(analysis.classes),):
        raise ValueError(f"removed has shape {removed.shape}; expected one flag per class ({len(analysis.classes)})")
    blocked = [c for c in np.flatnonzero(removed) if int(c) in analysis.blocked]
    if blocked:
        raise ValueError(f"class {blocked[0]} is blocked: {analysis.blocked[int(blocked[0])]}")


def _rewrite_node(rewrite: _Rewrite, node: ir.Node) -> None:
    op = node.op_type
    x, out = node.inputs[0] if node.inputs else None, node.outputs[0]
    keep_in, keep_out = rewrite.keep(x), rewrite.keep(out)
    if op == "Conv":
        group = node.attributes["group"].as_int() if "group" in node.attributes else 1
        if group == 1:
            rewrite.slice_input(node, 1, 1, keep_in)
        if rewrite.zero_only:
            return
        rewrite.slice_input(node, 1, 0, keep_out)
        if len(node.inputs) > 2:
            rewrite.slice_input(node, 2, 0, keep_out)
        if group > 1 and keep_in is not None and not keep_in.all():
            node.attributes["group"] = ir.AttrInt64("group", int(keep_in.sum()))
    elif op in ("Gemm", "MatMul"):
        trans_b = op == "Gemm" and "transB" in node.attributes and node.attributes["transB"].as_int()
        rewrite.slice_input(node, 1, 1 if trans_b else 0, keep_in)
        if rewrite.zero_only:
            return
        rewrite.slice_input(node, 1, 0 if trans_b else 1, keep_out)
        bias = _const(node.inputs[2]) if len(node.inputs) > 2 else None
        if bias is not None and keep_out is not None and bias.shape and bias.shape[-1] == len(keep_out):
            rewrite.slice_input(node, 2, bias.ndim - 1, keep_out)
    elif op in PER_CHANNEL_NORMS:
        for index in range(1, len(node.inputs)):
            rewrite.slice_input(node, index, 0, keep_in)
    elif op in ELEMENTWISE and out in rewrite.analysis.maps:
        _slice_broadcast_constants(rewrite, node, rewrite.analysis.maps[out])
    elif op == "Reshape" and out in rewrite.analysis.maps:
        _reshape_target(rewrite, node)
    elif op == "Split" and x in rewrite.analysis.maps:
        _split_sizes(rewrite, node)


def _slice_broadcast_constants(rewrite: _Rewrite, node: ir.Node, channel_map: ChannelMap) -> None:
    out_rank = _rank(node.outputs[0])
    for index, value in enumerate(node.inputs):
        array = _const(value)
        if array is None or value in rewrite.analysis.maps:
            continue
        axis = channel_map.axis - (out_rank - array.ndim)
        if 0 <= axis < array.ndim and array.shape[axis] == channel_map.length:
            rewrite.slice_input(node, index, axis, rewrite.keep(node.outputs[0]))


def _reshape_target(rewrite: _Rewrite, node: ir.Node) -> None:
    out = node.outputs[0]
    channel_map = rewrite.analysis.maps[out]
    target = _const(node.inputs[1]).copy()
    kept = _kept_dims(channel_map, rewrite.analysis.kept_mask(out, rewrite.removed))
    for offset, size in enumerate(kept):
        if target[channel_map.axis + offset] > 0:
            target[channel_map.axis + offset] = size
    rewrite.replace(node, 1, target)


def _split_sizes(rewrite: _Rewrite, node: ir.Node) -> None:
    x = node.inputs[0]
    channel_map = rewrite.analysis.maps[x]
    axis = (node.attributes["axis"].as_int() if "axis" in node.attributes else 0) % _rank(x)
    if axis != channel_map.axis:
        return
    sizes = [int(rewrite.keep(output).sum()) for output in node.outputs]
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        rewrite.replace(node, 1, np.array(sizes, dtype=np.int64))
    elif "split" in node.attributes or (len(set(sizes)) > 1 and _opset(node) < 13):
        node.attributes["split"] = ir.AttrInt64s("split", sizes)
    elif len(set(sizes)) > 1:  # since opset 13 the sizes are an input
        node.attributes.pop("num_outputs", None)
        sizes_value = add_initializer(rewrite.graph, f"{node.name}_split", np.array(sizes), rewrite.names)
        node.resize_inputs(2)
        node.replace_input_with(1, sizes_value)


def _kept_dims(channel_map: ChannelMap, mask: np.ndarray) -> list[int]:
    if mask.ndim == 1:
        return [int(mask.sum())]
    return [int(mask.any(axis=1).sum()), int(mask.any(axis=0).sum())]


def _resize(value: ir.Value, channel_map: ChannelMap, mask: np.ndarray) -> None:
    if value.shape is None:
        return
    dims = list(value.shape)
    for offset, size in enumerate(_kept_dims(channel_map, mask)):
        dims[channel_map.axis + offset] = size
    value.shape = ir.Shape(dims)
