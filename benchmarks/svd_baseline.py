"""Truncated-SVD low rank on an ONNX model: the naive baseline for Maestro.

Each constant 2-D Gemm/MatMul weight (and, optionally, each group-1 Conv as a k×k
Conv to r channels followed by a 1×1 Conv) is replaced by its rank-r SVD split,
U·√S and √S·Vᵀ, with no fine-tuning.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper


@dataclass(frozen=True)
class LowRankStats:
    """What `svd_lowrank` factored: layer count and their params before and after."""

    layers: int
    params_before: int
    params_after: int


def _matrix(node: onnx.NodeProto, weights: dict[str, np.ndarray], conv: bool) -> np.ndarray | None:
    """The node's weight as a 2-D matrix ``[out, in]``, or None when it is not factorable."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    w = weights.get(node.input[1]) if len(node.input) > 1 else None
    if w is None:
        return None
    if node.op_type == "MatMul" and w.ndim == 2:
        return w.T
    if node.op_type == "Gemm" and w.ndim == 2:
        return w if attrs.get("transB", 0) else w.T
    if conv and node.op_type == "Conv" and w.ndim >= 3 and attrs.get("group", 1) == 1:
        return w.reshape(w.shape[0], -1)
    return None


def _rank(matrix: np.ndarray, fraction: float) -> int:
    return max(1, math.ceil(fraction * min(matrix.shape)))


def _factored(matrix: np.ndarray, rank: int, skip_larger: bool) -> bool:
    m, n = matrix.shape
    return not (skip_larger and rank * (m + n) >= m * n)


def _constants(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Identity" and node.input[0] in weights:
            weights[node.output[0]] = weights[node.input[0]]
    return weights


def choose_fraction(proto: onnx.ModelProto, target: float, *, conv: bool) -> float:
    """The rank fraction whose factored layers keep about ``target`` of their params (bisection)."""
    weights = _constants(proto)
    matrices = [m for node in proto.graph.node if (m := _matrix(node, weights, conv)) is not None]
    low, high = 0.0, 1.0
    for _ in range(30):
        fraction = (low + high) / 2
        kept = [(m.size, _rank(m, fraction) * sum(m.shape)) for m in matrices]
        kept = [(b, a) for (b, a), m in zip(kept, matrices, strict=True) if _factored(m, _rank(m, fraction), True)]
        share = sum(a for _, a in kept) / max(1, sum(b for b, _ in kept))
        low, high = (fraction, high) if share < target else (low, fraction)
    return low


def svd_lowrank(
    proto: onnx.ModelProto, fraction: float, *, conv: bool = False, skip_larger: bool = True
) -> tuple[onnx.ModelProto, LowRankStats]:
    """Replace each constant 2-D Gemm/MatMul weight (and group-1 Conv with ``conv``) by a rank-r product.

    ``r = ceil(fraction * min(m, n))``. A Gemm/MatMul becomes two of the same op; a Conv
    becomes a k×k Conv to r channels then a 1×1 Conv. Layers whose factors would hold
    as many params as the original are skipped when ``skip_larger``.
    """
    model = copy.deepcopy(proto)
    weights = _constants(model)
    nodes, new_inits, layers, before, after = [], [], 0, 0, 0
    for node in model.graph.node:
        matrix = _matrix(node, weights, conv)
        rank = _rank(matrix, fraction) if matrix is not None else 0
        if matrix is None or not _factored(matrix, rank, skip_larger):
            nodes.append(node)
            continue
        u, s, vt = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
        root = np.sqrt(s[:rank])
        left, right = (u[:, :rank] * root).astype(np.float32), (root[:, None] * vt[:rank]).astype(np.float32)
        pair, inits = _split(node, left, right, weights[node.input[1]].shape)
        nodes += pair
        new_inits += inits
        layers, before, after = layers + 1, before + matrix.size, after + left.size + right.size
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(new_inits)
    _drop_unused_initializers(model)
    return model, LowRankStats(layers, before, after)


def _split(
    node: onnx.NodeProto, left: np.ndarray, right: np.ndarray, shape: tuple[int, ...]
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Two nodes computing ``node`` with ``W[out, in] ≈ left[out, r] @ right[r, in]``."""
    name = node.name or node.output[0]
    first, second, mid = f"{name}/svd_in", f"{name}/svd_out", f"{node.output[0]}/svd_mid"
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":
        w_in = right.reshape(right.shape[0], *shape[1:])
        w_out = left.reshape(*left.shape, *([1] * (len(shape) - 2)))
        a = helper.make_node("Conv", [node.input[0], first], [mid], name=first, **attrs)
        b_attrs = {"kernel_shape": [1] * (len(shape) - 2)} if "kernel_shape" in attrs else {}
        b = helper.make_node("Conv", [mid, second, *node.input[2:]], list(node.output), name=second, **b_attrs)
    elif node.op_type == "MatMul":
        w_in, w_out = right.T, left.T
        a = helper.make_node("MatMul", [node.input[0], first], [mid], name=first)
        b = helper.make_node("MatMul", [mid, second], list(node.output), name=second)
    else:  # Gemm: y = alpha * A' @ W' + beta * C with W' = right.T @ left.T as [in, out]
        w_in, w_out = right.T, left.T
        a = helper.make_node("Gemm", [node.input[0], first], [mid], name=first, transA=attrs.get("transA", 0))
        tail = {k: attrs[k] for k in ("alpha", "beta") if k in attrs}
        b = helper.make_node("Gemm", [mid, second, *node.input[2:]], list(node.output), name=second, **tail)
    inits = [numpy_helper.from_array(np.ascontiguousarray(w_in), first), numpy_helper.from_array(w_out, second)]
    return [a, b], inits


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    outputs = {o.name for o in model.graph.output}
    consumed = {name for node in model.graph.node for name in node.input} | outputs
    live = [n for n in model.graph.node if n.op_type != "Identity" or n.output[0] in consumed]
    del model.graph.node[:]
    model.graph.node.extend(live)
    used = {name for node in model.graph.node for name in node.input} | outputs
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
