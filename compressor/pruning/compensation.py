"""Mean compensation: a removed channel's average contribution moves into the next layer's bias.

A removed input channel c of a layer contributed ``W[:, c] * x_c``. Replacing
``x_c`` by its mean over the data, rather than by zero, keeps the layer's output
mean where it was; that constant is ``W[:, c] * mean(x_c)`` summed over the
kernel, and it goes into the bias. It is exact for the mean (up to the zero
padding at the borders of a Conv) and costs one onnxruntime pass over a few
batches. It is applied before the surgery, on the original weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx
import onnx_ir as ir

from compressor import runtime
from compressor.ir import UniqueNames, add_initializer, to_proto
from compressor.ir import constant_array as _const
from compressor.pruning.channels import ChannelGraph
from compressor.pruning.node_facts import attr as _attr


def compensate_means(
    model: ir.Model, analysis: ChannelGraph, removed: np.ndarray, batches: Iterable[Mapping[str, np.ndarray]]
) -> list[str]:
    """Fold the mean of every removed input channel into its reader's bias, in place; the layers changed.

    ``batches``: input feeds (a few calibration batches). Conv (group 1) and Gemm readers are
    compensated; a MatMul has no bias of its own and is left alone.
    """
    readers = _readers(model.graph, analysis, removed)
    if not readers:
        return []
    means = _input_means(model, {node.inputs[0].name for node, _ in readers}, batches)
    names = UniqueNames(model.graph)
    changed = []
    for node, dropped in readers:
        mean = means.get(node.inputs[0].name)
        if mean is None or len(mean) != len(dropped):
            continue
        shift = _shift(node, dropped, mean)
        if shift is None:
            continue
        _add_to_bias(model.graph, node, shift, names)
        changed.append(node.name)
    return changed


def _readers(graph: ir.Graph, analysis: ChannelGraph, removed: np.ndarray) -> list[tuple[ir.Node, np.ndarray]]:
    """(layer, dropped input positions) for every Conv (group 1) or Gemm that loses input channels."""
    found = []
    for node in graph:
        if node.op_type not in ("Conv", "Gemm") or node.inputs[0] not in analysis.maps:
            continue
        if node.op_type == "Conv" and _attr(node, "group", 1) != 1:
            continue
        dropped = ~analysis.kept_mask(node.inputs[0], removed)
        if dropped.ndim == 1 and dropped.any():
            found.append((node, dropped))
    return found


def _input_means(
    model: ir.Model, names: set[str], batches: Iterable[Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Per tensor in ``names``: its mean per position of axis 1 (channels, or a Gemm's columns)."""
    proto = to_proto(model)
    present = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in sorted(names - present))
    session = runtime.make_session(proto, options=runtime.session_options(many_outputs=True))
    wanted = [o.name for o in session.get_outputs()]
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for feeds in batches:
        outputs = dict(zip(wanted, session.run(None, dict(feeds)), strict=True))
        for name in names:
            array = outputs[name].astype(np.float64)
            axes = tuple(a for a in range(array.ndim) if a != 1)
            sums[name] = sums.get(name, 0.0) + array.sum(axis=axes)
            counts[name] = counts.get(name, 0) + array.size // array.shape[1]
    return {name: sums[name] / counts[name] for name in sums}


def _shift(node: ir.Node, dropped: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    weight = _const(node.inputs[1])
    if weight is None:
        return None
    if node.op_type == "Conv":
        return weight[:, dropped].reshape(weight.shape[0], int(dropped.sum()), -1).sum(axis=2) @ mean[dropped]
    if _attr(node, "transA", 0):
        return None
    alpha = node.attributes["alpha"].as_float() if "alpha" in node.attributes else 1.0
    taken = weight[:, dropped] if _attr(node, "transB", 0) else weight[dropped].T
    return alpha * (taken @ mean[dropped])


def _add_to_bias(graph: ir.Graph, node: ir.Node, shift: np.ndarray, names: UniqueNames) -> None:
    index = 2
    bias = _const(node.inputs[index]) if len(node.inputs) > index and node.inputs[index] is not None else None
    if node.op_type == "Gemm":
        beta = node.attributes["beta"].as_float() if "beta" in node.attributes else 1.0
        shift = shift / beta if bias is not None else shift
        if bias is not None and bias.shape != shift.shape:
            bias = np.broadcast_to(bias, np.broadcast_shapes(bias.shape, shift.shape)).copy()
    dtype = bias.dtype if bias is not None else np.float32
    new = (shift if bias is None else bias + shift).astype(dtype)
    if bias is None:
        if node.op_type == "Gemm" and "beta" in node.attributes:
            node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        node.resize_inputs(3)
    old = node.inputs[index]
    node.replace_input_with(index, add_initializer(graph, f"{node.name or 'layer'}_compensated_bias", new, names))
    if old is not None and not old.uses() and not old.is_graph_input() and old.name:
        graph.initializers.pop(old.name, None)
