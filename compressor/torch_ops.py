"""Torch implementations of ONNX operators, one small function per op, for `compressor.torch_bridge`.

Each handler takes the node's inputs (``None`` for an omitted optional input) and a
`Call` holding its attributes as plain Python values, and returns one tensor or a
sequence of them (the node's outputs in order). Shape-computing ops work on int64
tensors and turn them into Python ints with ``.tolist()``; gradients only flow through
the float paths. `CHECKS` holds the up-front checks for attribute values a handler
does not implement, so the bridge can refuse a model before running it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import reduce
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

Tensor = torch.Tensor
Result = Tensor | Sequence[Tensor]


@dataclass(frozen=True)
class Call:
    """What a handler knows about its node besides the inputs."""

    op_type: str
    attrs: dict[str, Any] = field(default_factory=dict)
    opset: int = 18
    n_outputs: int = 1

    def get(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)


Handler = Callable[[list[Tensor | None], Call], Result]
OPS: dict[str, Handler] = {}
CHECKS: dict[str, Callable[[Call], str | None]] = {}  # op -> reason it cannot run, or None

_TORCH_DTYPES = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
    np.dtype(np.float16): torch.float16,
    np.dtype(np.int64): torch.int64,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.int16): torch.int16,
    np.dtype(np.int8): torch.int8,
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.bool_): torch.bool,
}


def torch_dtype(onnx_type: int) -> torch.dtype:
    """The torch dtype of an ONNX ``TensorProto`` data type number."""
    data_type = ir.DataType(onnx_type)
    if data_type == ir.DataType.BFLOAT16:
        return torch.bfloat16
    try:
        return _TORCH_DTYPES[np.dtype(data_type.numpy())]
    except (KeyError, TypeError):
        raise ValueError(f"no torch dtype for ONNX type {data_type.name}") from None


def op(*names: str) -> Callable[[Handler], Handler]:
    """Register the decorated handler for each of the ONNX op types ``names``."""

    def register(handler: Handler) -> Handler:
        for name in names:
            OPS[name] = handler
        return handler

    return register


def ints(t: Tensor | None) -> list[int]:
    """A shape-like tensor's values as Python ints ([] for an omitted input)."""
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]


def axis_of(axis: int, rank: int) -> int:
    """``axis`` counted from the front of a ``rank``-dimensional tensor."""
    return axis + rank if axis < 0 else axis


def _axes(inputs: list[Tensor | None], call: Call, index: int, since: int) -> list[int] | None:
    """Axes from input ``index`` (opset >= ``since``) or the ``axes`` attribute; None when absent."""
    if call.opset >= since:
        t = inputs[index] if len(inputs) > index else None
        return None if t is None else ints(t)
    axes = call.get("axes")
    return None if axes is None else list(axes)


def _torch_pads(begin: Sequence[int], end: Sequence[int]) -> list[int]:
    """ONNX per-axis (begin, end) pads, first axis first, as F.pad's list (last axis first)."""
    return [p for b, e in zip(reversed(begin), reversed(end), strict=True) for p in (b, e)]


# --- elementwise ------------------------------------------------------------------------------

_UNARY: dict[str, Callable[[Tensor], Tensor]] = {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Sqrt": torch.sqrt, "Exp": torch.exp,
    "Log": torch.log, "Neg": torch.neg, "Abs": torch.abs, "Erf": torch.erf, "Floor": torch.floor,
    "Ceil": torch.ceil, "Reciprocal": torch.reciprocal, "Not": torch.logical_not, "Sign": torch.sign,
    "Round": torch.round, "Sin": torch.sin, "Cos": torch.cos, "Softplus": F.softplus, "HardSwish": F.hardswish,
    "Softsign": F.softsign, "Mish": F.mish, "Identity": lambda x: x,
}  # fmt: skip
_BINARY: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Pow": torch.pow, "Equal": torch.eq, "Less": torch.lt,
    "Greater": torch.gt, "LessOrEqual": torch.le, "GreaterOrEqual": torch.ge, "And": torch.logical_and,
    "Or": torch.logical_or, "Xor": torch.logical_xor,
}  # fmt: skip
_VARIADIC: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Sum": torch.add, "Mean": torch.add, "Min": torch.minimum, "Max": torch.maximum,
}  # fmt: skip

for _name, _fn in _UNARY.items():
    OPS[_name] = lambda inputs, call, fn=_fn: fn(inputs[0])
for _name, _fn2 in _BINARY.items():
    OPS[_name] = lambda inputs, call, fn=_fn2: fn(inputs[0], inputs[1])


@op(*_VARIADIC)
def _variadic(inputs: list[Tensor | None], call: Call) -> Tensor:
    name = call.op_type
    result = reduce(_VARIADIC[name], [t for t in inputs if t is not None])
    return result / len(inputs) if name == "Mean" else result


@op("Div")
def _div(inputs: list[Tensor | None], call: Call) -> Tensor:
    a, b = inputs[0], inputs[1]
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


@op("Mod")
def _mod(inputs: list[Tensor | None], call: Call) -> Tensor:
    return (torch.fmod if call.get("fmod", 0) else torch.remainder)(inputs[0], inputs[1])


@op("Where")
def _where(inputs: list[Tensor | None], call: Call) -> Tensor:
    return torch.where(inputs[0].bool(), inputs[1], inputs[2])


@op("LeakyRelu")
def _leaky_relu(inputs: list[Tensor | None], call: Call) -> Tensor:
    return F.leaky_relu(inputs[0], call.get("alpha", 0.01))


@op("Elu")
def _elu(inputs: list[Tensor | None], call: Call) -> Tensor:
    return F.elu(inputs[0], call.get("alpha", 1.0))


@op("PRelu")
def _prelu(inputs: list[Tensor | None], call: Call) -> Tensor:
    x, slope = inputs[0], inputs[1]
    return torch.where(x < 0, x * slope, x)


@op("Gelu")
def _gelu(inputs: list[Tensor | None], call: Call) -> Tensor:
    return F.gelu(inputs[0], approximate=call.get("approximate", "none"))


@op("HardSigmoid")
def _hard_sigmoid(inputs: list[Tensor | None], call: Call) -> Tensor:
    return torch.clamp(inputs[0] * call.get("alpha", 0.2) + call.get("beta", 0.5), 0.0, 1.0)


@op("Clip")
def _clip(inputs: list[Tensor | None], call: Call) -> Tensor:
    x = inputs[0]
    if call.opset < 11:
        return torch.clamp(x, call.get("min", -math.inf), call.get("max", math.inf))
    low = inputs[1] if len(inputs) > 1 else None
    high = inputs[2] if len(inputs) > 2 else None
    return torch.clamp(x, low, high) if low is not None or high is not None else x


@op("Softmax", "LogSoftmax")
def _softmax(inputs: list[Tensor | None], call: Call) -> Tensor:
    x, fn = inputs[0], torch.log_softmax if call.op_type == "LogSoftmax" else torch.softmax
    if call.opset >= 13:
        return fn(x, call.get("axis", -1))
    axis = axis_of(call.get("axis", 1), x.dim())
    return fn(x.reshape(math.prod(x.shape[:axis]), -1), 1).reshape(x.shape)


@op("Cast")
def _cast(inputs: list[Tensor | None], call: Call) -> Tensor:
    return inputs[0].to(torch_dtype(call.get("to")))


@op("CastLike")
def _cast_like(inputs: list[Tensor | None], call: Call) -> Tensor:
    return inputs[0].to(inputs[1].dtype)


@op("Dropout")
def _dropout(inputs: list[Tensor | None], call: Call) -> Result:
    x = inputs[0]
    return (x, torch.ones_like(x, dtype=torch.bool)) if call.n_outputs > 1 else x


# --- convolution, normalization and pooling ---------------------------------------------------


def _same_pads(auto_pad: str, size: Sequence[int], kernel: Sequence[int], strides: Sequence[int]) -> list[int]:
    """Begin pads then end pads for SAME_UPPER/SAME_LOWER (kernel already dilated)."""
    total = [max(0, (math.ceil(n / s) - 1) * s + k - n) for n, k, s in zip(size, kernel, strides, strict=True)]
    small = [t // 2 for t in total]
    big = [t - h for t, h in zip(total, small, strict=True)]
    return small + big if auto_pad == "SAME_UPPER" else big + small


def _pads(call: Call, size: Sequence[int], kernel: Sequence[int], strides: Sequence[int]) -> list[int]:
    auto_pad = call.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return _same_pads(auto_pad, size, kernel, strides)
    if auto_pad == "VALID":
        return [0] * (2 * len(size))
    return list(call.get("pads", [0] * (2 * len(size))))


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@op("Conv")
def _conv(inputs: list[Tensor | None], call: Call) -> Tensor:
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    n = w.dim() - 2
    strides, dilations = call.get("strides", [1] * n), call.get("dilations", [1] * n)
    kernel = [(k - 1) * d + 1 for k, d in zip(w.shape[2:], dilations, strict=True)]
    pads = _pads(call, x.shape[2:], kernel, strides)
    if pads[:n] != pads[n:]:
        x, pads = F.pad(x, _torch_pads(pads[:n], pads[n:])), [0] * (2 * n)
    return _CONV[n](x, w, b, strides, pads[:n], dilations, call.get("group", 1))


@op("ConvTranspose")
def _conv_transpose(inputs: list[Tensor | None], call: Call) -> Tensor:
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    n = w.dim() - 2
    strides, dilations = call.get("strides", [1] * n), call.get("dilations", [1] * n)
    extra = list(call.get("output_padding", [0] * n))
    geometry = zip(x.shape[2:], strides, w.shape[2:], dilations, extra, strict=True)
    full = [(i - 1) * s + (k - 1) * d + 1 + e for i, s, k, d, e in geometry]
    auto_pad, shape = call.get("auto_pad", "NOTSET"), call.get("output_shape")
    if shape is None and auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        shape = [i * s for i, s in zip(x.shape[2:], strides, strict=True)]
    if shape is not None:
        total = [f - o for f, o in zip(full, list(shape)[-n:], strict=True)]
        upper = auto_pad == "SAME_UPPER"
        pads = [t // 2 if upper else t - t // 2 for t in total] + [t - t // 2 if upper else t // 2 for t in total]
    else:
        pads = [0] * (2 * n) if auto_pad == "VALID" else list(call.get("pads", [0] * (2 * n)))
    y = _CONV_T[n](x, w, None, strides, 0, 0, call.get("group", 1), dilations)
    y = F.pad(y, _torch_pads([-p for p in pads[:n]], [e - p for e, p in zip(extra, pads[n:], strict=True)]))
    return y if b is None else y + b.reshape(-1, *[1] * n)


@op("BatchNormalization")
def _batch_norm(inputs: list[Tensor | None], call: Call) -> Tensor:
    x, scale, bias, mean, var = inputs[:5]
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, call.get("epsilon", 1e-5))


CHECKS["BatchNormalization"] = lambda call: "training_mode=1" if call.get("training_mode", 0) else None


@op("InstanceNormalization")
def _instance_norm(inputs: list[Tensor | None], call: Call) -> Tensor:
    return F.instance_norm(inputs[0], weight=inputs[1], bias=inputs[2], eps=call.get("epsilon", 1e-5))


@op("LayerNormalization")
def _layer_norm(inputs: list[Tensor | None], call: Call) -> Tensor:
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    axes = list(range(axis_of(call.get("axis", -1), x.dim()), x.dim()))
    mean = x.mean(axes, keepdim=True)
    var = ((x - mean) ** 2).mean(axes, keepdim=True)
    y = (x - mean) / torch.sqrt(var + call.get("epsilon", 1e-5)) * scale
    return y if bias is None else y + bias


CHECKS["LayerNormalization"] = lambda call: "Mean/InvStdDev outputs" if call.n_outputs > 1 else None


def _pool_geometry(x: Tensor, call: Call) -> tuple[list[int], list[int], list[int], list[int]]:
    """Kernel, strides, declared pads and the extra end pads that make floor-mode pooling give ONNX's size."""
    kernel = list(call.get("kernel_shape"))
    n = len(kernel)
    strides, dilations = call.get("strides", [1] * n), call.get("dilations", [1] * n)
    size = x.shape[2:]
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    pads = _pads(call, size, dilated, strides)
    extra = []
    for i in range(n):
        span = size[i] + pads[i] + pads[n + i] - dilated[i]
        out = (math.ceil if call.get("ceil_mode", 0) else math.floor)(span / strides[i]) + 1
        if call.get("ceil_mode", 0) and (out - 1) * strides[i] >= size[i] + pads[i]:
            out -= 1  # the last window may not start in the end padding
        extra.append(max(0, (out - 1) * strides[i] + dilated[i] - (size[i] + pads[i] + pads[n + i])))
    return kernel, list(strides), pads, extra


_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@op("MaxPool")
def _max_pool(inputs: list[Tensor | None], call: Call) -> Tensor:
    x = inputs[0]
    kernel, strides, pads, extra = _pool_geometry(x, call)
    n = len(kernel)
    if any(pads) or any(extra):
        fill = -math.inf if x.is_floating_point() else torch.iinfo(x.dtype).min
        x = F.pad(x, _torch_pads(pads[:n], [p + e for p, e in zip(pads[n:], extra, strict=True)]), value=fill)
    return _MAX_POOL[n](x, kernel, strides, 0, call.get("dilations", [1] * n))


CHECKS["MaxPool"] = lambda call: "the Indices output" if call.n_outputs > 1 else None


@op("AveragePool")
def _average_pool(inputs: list[Tensor | None], call: Call) -> Tensor:
    x = inputs[0]
    kernel, strides, pads, extra = _pool_geometry(x, call)
    n = len(kernel)
    ends = [p + e for p, e in zip(pads[n:], extra, strict=True)]
    pool = _AVG_POOL[n]
    if not any(pads) and not any(extra):
        return pool(x, kernel, strides)
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    if call.get("count_include_pad", 0):  # the declared pads count, the ceil_mode tail does not
        ones = F.pad(ones, _torch_pads(pads[:n], pads[n:]), value=1.0)
        ones = F.pad(ones, _torch_pads([0] * n, extra))
    else:
        ones = F.pad(ones, _torch_pads(pads[:n], ends))
    total = pool(F.pad(x, _torch_pads(pads[:n], ends)), kernel, strides)
    return total / pool(ones, kernel, strides)


CHECKS["AveragePool"] = lambda call: "dilations" if any(d != 1 for d in call.get("dilations", [])) else None


@op("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(inputs: list[Tensor | None], call: Call) -> Tensor:
    x = inputs[0]
    dims = list(range(2, x.dim()))
    return x.mean(dims, keepdim=True) if call.op_type == "GlobalAveragePool" else x.amax(dims, keepdim=True)


# --- matrix products ----------------------------------------------------------------------------


@op("Gemm")
def _gemm(inputs: list[Tensor | None], call: Call) -> Tensor:
    a, b = inputs[0], inputs[1]
    c = inputs[2] if len(inputs) > 2 else None
    a = a.t() if call.get("transA", 0) else a
    b = b.t() if call.get("transB", 0) else b
    y = a @ b
    alpha, beta = call.get("alpha", 1.0), call.get("beta", 1.0)
    y = y if alpha == 1.0 else alpha * y
    return y if c is None else y + (c if beta == 1.0 else beta * c)


@op("MatMul")
def _matmul(inputs: list[Tensor | None], call: Call) -> Tensor:
    return torch.matmul(inputs[0], inputs[1])


@op("Einsum")
def _einsum(inputs: list[Tensor | None], call: Call) -> Tensor:
    return torch.einsum(call.get("equation"), *[t for t in inputs if t is not None])


# The shape and reduction handlers live in their own module; importing it registers them.
from compressor import torch_ops_shapes  # noqa: E402, F401

SUPPORTED = frozenset(OPS) | {"Constant"}
