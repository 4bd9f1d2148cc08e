"""Facts about one ONNX node or value that the channel analysis reads: attributes, axes, sizes, dims."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from compressor.ir import constant_array


def attr(node: ir.Node, name: str, default: int) -> int:
    attribute = node.attributes.get(name)
    return default if attribute is None else attribute.as_int()


def ints(node: ir.Node, name: str) -> list[int] | None:
    attribute = node.attributes.get(name)
    return None if attribute is None else list(attribute.as_ints())


def opset(node: ir.Node) -> int:
    graph = node.graph
    imports = graph.opset_imports if graph is not None else {}
    return imports.get("", imports.get("ai.onnx", 13))


def axes(node: ir.Node) -> list[int] | None:
    """The axes of a Reduce/Squeeze/Unsqueeze node: its attribute, or its constant second input."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = constant_array(node.inputs[1])
        return None if axes is None else [int(a) for a in axes.ravel()]
    return ints(node, "axes")


def sliced_axes(node: ir.Node, rank: int) -> set[int] | None:
    """The axes a Slice cuts (attribute form before opset 10, inputs after); None when not constant."""
    if len(node.inputs) == 1:
        starts = ints(node, "starts") or []
        axes = ints(node, "axes") or list(range(len(starts)))
    elif len(node.inputs) > 3 and node.inputs[3] is not None:
        given = constant_array(node.inputs[3])
        axes = None if given is None else given.tolist()
    else:
        starts = constant_array(node.inputs[1])
        axes = None if starts is None else list(range(len(starts)))
    return None if axes is None else {a % rank for a in axes}


def split_sizes(node: ir.Node, length: int) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        sizes = constant_array(node.inputs[1])
        return None if sizes is None else [int(s) for s in sizes]
    given = ints(node, "split")
    if given:
        return given
    parts = len(node.outputs)
    if length % parts:
        return None
    return [length // parts] * parts


def reshaped(node: ir.Node, dims: list[int | str]) -> list[int | str] | None:
    """The output dims of a Reshape (constant target) or Flatten of an input of ``dims``; None if unknown."""
    if node.op_type == "Flatten":
        axis = attr(node, "axis", 1) % len(dims)
        return [product(dims[:axis]), product(dims[axis:])]
    target = constant_array(node.inputs[1])
    if target is None:
        return None
    allow_zero = attr(node, "allowzero", 0)
    out: list[int | str] = [dims[i] if t == 0 and not allow_zero else int(t) for i, t in enumerate(target.tolist())]
    if -1 in out:
        known = product([d for d in out if d != -1])
        total = product(dims)
        if isinstance(total, int) and isinstance(known, int) and known:
            out[out.index(-1)] = total // known
        elif total == known or (isinstance(total, str) and isinstance(known, int) and static(dims) == known):
            out[out.index(-1)] = next(d for d in dims if isinstance(d, str))  # the one symbolic dim (the batch)
        else:
            return None
    return out


def static(dims: list[int | str]) -> int:
    return int(np.prod([d for d in dims if isinstance(d, int)]))


def product(dims: list[int | str]) -> int | str:
    """The product of ``dims``: an int, or a symbolic dim's name when exactly one is symbolic and the rest are 1."""
    symbolic = [d for d in dims if isinstance(d, str)]
    if not symbolic:
        return int(np.prod(dims)) if dims else 1
    return symbolic[0] if len(symbolic) == 1 and static(dims) == 1 else "?"


def same_dim(a: int | str, b: int | str) -> bool:
    """Whether two dims may be the same size (a symbolic one may be anything)."""
    return a == b or isinstance(a, str) or isinstance(b, str)


def rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def dims(value: ir.Value) -> list[int | str] | None:
    """Static dims as ints, symbolic ones as their names (None: shape unknown)."""
    if value.shape is None:
        const = constant_array(value)
        return None if const is None else list(const.shape)
    return [d if isinstance(d, int) else str(d) for d in value.shape]
