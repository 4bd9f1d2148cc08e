"""Quantization arithmetic (scales and zero points from ranges, weight quantization) and the weight rewrite using it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from compressor.ir import UniqueNames, add_initializer

if TYPE_CHECKING:
    from compressor.quantization.int8_config import QuantizeInt8Config


@dataclass(frozen=True)
class QuantParams:
    """Affine quantization of one tensor: real = (q - zero_point) * scale."""

    scale: float
    zero_point: int
    dtype: type[np.integer]

    @property
    def qmin(self) -> int:
        return int(np.iinfo(self.dtype).min)

    @property
    def qmax(self) -> int:
        return int(np.iinfo(self.dtype).max)

    def quantize(self, values: np.ndarray) -> np.ndarray:
        q = np.round(values / np.float32(self.scale)) + self.zero_point
        return np.clip(q, self.qmin, self.qmax).astype(self.dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return ((q.astype(np.int32) - self.zero_point) * np.float32(self.scale)).astype(np.float32)


def power_of_two(scale: np.ndarray | float) -> np.ndarray:
    """The next power of two at or above ``scale`` (so no value clips that did not before)."""
    return np.exp2(np.ceil(np.log2(np.maximum(scale, np.finfo(np.float32).tiny)))).astype(np.float32)


def half_exact(scale: np.ndarray) -> np.ndarray:
    """``scale`` rounded up to a float16 value, where float16 holds it at full precision (its normal range).

    A scale float16 holds exactly is stored in half the bytes (`backends/narrow_storage.py`).
    Rounding up moves it by at most 2**-10 of itself and clips no value that did not clip before.
    """
    scale = np.asarray(scale, np.float32)
    half = scale.astype(np.float16)
    up = np.where(half.astype(np.float32) < scale, np.nextafter(half, np.float16(np.inf)), half).astype(np.float32)
    normal = (scale >= np.finfo(np.float16).tiny) & (scale < np.finfo(np.float16).max / 2)
    return np.where(normal, up, scale).astype(np.float32)


def activation_params(low: float, high: float, config: QuantizeInt8Config) -> QuantParams:
    """Scale and zero point for an activation observed in [low, high] (low <= 0 <= high)."""
    if config.activations == "asymmetric_uint8":
        scale = (high - low) / 255.0
        if scale <= 0:
            return QuantParams(1.0, 0, np.uint8)
        if config.power_of_two:
            scale = float(power_of_two(scale))
        zero = int(np.clip(np.round(-low / scale), 0, 255))
        return QuantParams(float(np.float32(scale)), zero, np.uint8)
    magnitude = max(abs(low), abs(high))
    scale = magnitude / 127.0 if magnitude > 0 else 1.0
    if config.power_of_two:
        scale = float(power_of_two(scale))
    if config.activations == "symmetric_uint8":
        return QuantParams(float(np.float32(scale)), 128, np.uint8)
    return QuantParams(float(np.float32(scale)), 0, np.int8)


def quantize_weight(
    weight: np.ndarray, axis: int, config: QuantizeInt8Config
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int8 weight, its float32 scale(s) and int8 zero point(s), per channel on ``axis`` or per tensor.

    ``config.weight_bits`` = 7 keeps values in [-63, 63] (symmetric) so onnxruntime's
    u8s8 kernels cannot saturate their 16-bit intermediate sums. Per channel falls
    back to one scale where that reaches ``config.per_tensor_min_sqnr_db``.
    """
    if config.per_channel and config.per_tensor_min_sqnr_db is not None and weight.shape[axis] > 1:
        single = quantize_weight(weight, axis, replace(config, per_channel=False))
        if weight_sqnr_db(weight, *single) >= config.per_tensor_min_sqnr_db:
            return single
    qmin, qmax = weight_limits(config)
    reduce = tuple(i for i in range(weight.ndim) if i != axis) if config.per_channel else None
    keep = config.per_channel
    if config.weights == "symmetric":
        scale = np.max(np.abs(weight), axis=reduce, keepdims=keep) / qmax
        scale = half_exact(np.where(scale > 0, scale, 1.0))
        if config.power_of_two:
            scale = power_of_two(scale)
        zero = np.zeros_like(scale)
    else:
        low = np.minimum(np.min(weight, axis=reduce, keepdims=keep), 0.0)
        high = np.maximum(np.max(weight, axis=reduce, keepdims=keep), 0.0)
        scale = (high - low) / (qmax - qmin)
        scale = half_exact(np.where(scale > 0, scale, 1.0))
        if config.power_of_two:
            scale = power_of_two(scale)
        zero = np.clip(np.round(qmin - low / scale), qmin, qmax)
    q = np.clip(np.round(weight / scale) + zero, qmin, qmax).astype(np.int8)
    flat = scale.reshape(-1) if config.per_channel else scale.reshape(())
    return q, flat.astype(np.float32), zero.reshape(flat.shape).astype(np.int8)


def weight_limits(config: QuantizeInt8Config) -> tuple[int, int]:
    """The integer range of weights: symmetric schemes drop the most negative value, so the range is even."""
    top = 2 ** (config.weight_bits - 1) - 1
    return (-top if config.weights == "symmetric" else -top - 1), top


def weight_settings(config: QuantizeInt8Config) -> tuple[object, ...]:
    """The config fields a quantized weight depends on: weights computed under equal settings are equal."""
    return (config.weights, config.weight_bits, config.per_channel, config.per_tensor_min_sqnr_db,
            config.power_of_two)  # fmt: skip


@dataclass(frozen=True)
class RoundedWeight:
    """A weight's integers chosen by rounding optimisation (`compressor.quantization.rounding`).

    It replaces rounding to nearest for the weight of that name wherever the config's weight
    ``settings`` are those it was optimised under; ``bias_shift`` (per output channel, or None)
    replaces bias correction's shift.
    """

    settings: tuple[object, ...]
    q: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    bias_shift: np.ndarray | None


def weight_sqnr_db(weight: np.ndarray, q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> float:
    """SQNR in dB of a per-tensor quantized ``weight`` (scalar ``scale`` and ``zero``)."""
    error = (q.astype(np.float64) - zero.astype(np.float64)) * scale.astype(np.float64) - weight
    noise = float(np.sum(error**2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(weight.astype(np.float64) ** 2)) / noise)


def output_shift(node: ir.Node, delta: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    """Per-output-channel mean shift ``(W_q - W) * E[x]`` of a Conv or Gemm, or None if shapes disagree."""
    if node.op_type == "Conv":
        groups = node.attributes["group"].as_int() if "group" in node.attributes else 1
        out_channels, in_per_group = delta.shape[:2]
        if mean.shape != (in_per_group * groups,) or out_channels % groups:
            return None
        per_input = delta.reshape(out_channels, in_per_group, -1).sum(axis=-1, dtype=np.float64)
        group_of = np.arange(out_channels) // (out_channels // groups)
        return np.sum(per_input * mean.reshape(groups, in_per_group)[group_of], axis=1)
    trans_b = "transB" in node.attributes and node.attributes["transB"].as_int()
    matrix = delta if trans_b else delta.T  # [N, K]
    return matrix.astype(np.float64) @ mean if mean.shape == (matrix.shape[1],) else None


def weight_channel_axis(node: ir.Node, ndim: int) -> int:
    """The output-channel axis of the weight: 0 for Conv and Gemm(transB=1), 1 for ConvTranspose, else the last.

    A grouped ConvTranspose's weight is [C_in, C_out / group, k...]: its axis 1 holds one group's channels.
    """
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm" and "transB" in node.attributes and node.attributes["transB"].as_int():
        return 0
    return ndim - 1


INT32_LIMIT = 2**31 - 1
BIAS_CORRECTED_OPS = frozenset({"Conv", "Gemm"})  # ops whose output shift `output_shift` can compute


WeightMemo = dict[tuple[object, ...], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]


def quantize_node_weights(
    graph: ir.Graph,
    node: ir.Node,
    input_params: QuantParams,
    config: QuantizeInt8Config,
    mean: np.ndarray | None,
    names: UniqueNames | None = None,
    memo: WeightMemo | None = None,
    rounded: Mapping[str, RoundedWeight] | None = None,
) -> float | None:
    """Put ``node``'s weight (and bias, int32) behind DequantizeLinear; with ``mean``, bias-correct first.

    ``memo`` keeps the quantized weight and its bias shift by weight name and
    settings, for callers that quantize variants of one float model. ``rounded``
    holds weights optimised by rounding (by weight name): where one matches, it
    is used as it is, its own bias shift instead of the correction from ``mean``.
    Returns the largest |bias correction|, or None when none was applied.
    """
    names = names or UniqueNames(graph)
    base = node.name or node.inputs[1].name
    scale, shift = quantize_weight_input(graph, node, config, mean, names, memo, rounded)
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    bias_array = None if bias is None else ir.convenience.get_const_tensor(bias)
    if bias is not None and (bias_array is None or len(bias_array.shape) != 1):
        return None  # a non-constant or broadcast bias stays float
    bias_array = None if bias_array is None else bias_array.numpy().astype(np.float64)
    if shift is not None:
        bias_array = (np.zeros(len(shift)) if bias_array is None else bias_array) - shift
    if bias_array is None:
        return None
    if node.op_type == "ConvTranspose" and scale.ndim and "group" in node.attributes:
        scale = np.tile(scale, node.attributes["group"].as_int())  # weight axis 1 repeats for every group
    bias_scale = (np.float64(np.float32(input_params.scale)) * scale.astype(np.float64)).astype(np.float32)
    bias_scale = np.broadcast_to(bias_scale, bias_array.shape).astype(np.float32)
    bias_q = np.clip(np.round(bias_array / bias_scale.astype(np.float64)), -INT32_LIMIT, INT32_LIMIT).astype(np.int32)
    bq_value = add_initializer(graph, f"{base}_bias_quantized", bias_q, names)
    bs_value = add_initializer(graph, f"{base}_bias_scale", bias_scale, names)
    bz_value = add_initializer(graph, f"{base}_bias_zero_point", np.zeros(bias_q.shape, np.int32), names)
    bias_dq = ir.Node("", "DequantizeLinear", [bq_value, bs_value, bz_value], attributes=[ir.AttrInt64("axis", 0)],
                      name=f"{base}_bias_dq")  # fmt: skip
    graph.insert_before(node, bias_dq)
    if len(node.inputs) < 3:
        node.resize_inputs(3)
    node.replace_input_with(2, bias_dq.outputs[0])
    return None if shift is None else float(np.max(np.abs(shift)))


def quantize_weight_input(
    graph: ir.Graph,
    node: ir.Node,
    config: QuantizeInt8Config,
    mean: np.ndarray | None = None,
    names: UniqueNames | None = None,
    memo: WeightMemo | None = None,
    rounded: Mapping[str, RoundedWeight] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Put ``node``'s weight (input 1) behind DequantizeLinear; return its scale(s) and, given ``mean``, the
    output shift its rounding causes (see `quantize_node_weights`)."""
    names = names or UniqueNames(graph)
    weight = node.inputs[1]
    axis = weight_channel_axis(node, len(weight.const_value.shape))
    key = (weight.name, node.op_type, axis, *weight_settings(config), None if mean is None else id(mean))
    optimised = (rounded or {}).get(weight.name)
    if optimised is not None and optimised.settings == weight_settings(config):
        q, scale, zero, shift = optimised.q, optimised.scale, optimised.zero, optimised.bias_shift
    elif memo is not None and key in memo:
        q, scale, zero, shift = memo[key]
    else:
        q, scale, zero, shift = _quantized_weight(node, axis, config, mean)
        if memo is not None:
            for array in (q, scale, zero, shift):
                if array is not None:
                    array.setflags(write=False)  # shared by every model built from the memo
            memo[key] = q, scale, zero, shift
    _read_through_dequantize(graph, node, 1, f"{node.name or weight.name}_weight", (q, scale, zero), axis, names)
    return scale, shift


def quantize_stored_input(
    graph: ir.Graph, node: ir.Node, index: int, axis: int, storage: QuantizeInt8Config, names: UniqueNames
) -> None:
    """Put a constant weight (input ``index``) of a node with no int8 kernel behind DequantizeLinear, a
    scale per row on ``axis`` (``storage``'s weight scheme, per channel): each embedding of a table,
    each gate unit of an LSTM, keeps its own range however the rows' norms differ."""
    value = node.inputs[index]
    quantized = quantize_weight(value.const_value.numpy().astype(np.float32), axis, storage)
    _read_through_dequantize(graph, node, index, f"{node.name or value.name}_input{index}", quantized, axis, names)


def quantize_constant_input(
    graph: ir.Graph, node: ir.Node, index: int, config: QuantizeInt8Config, names: UniqueNames
) -> None:
    """Put a constant input of an elementwise op (the bias a torch Linear adds after its MatMul) behind
    DequantizeLinear, per tensor with the activations' scheme and its own range, so the op can run on integers."""
    value = node.inputs[index]
    array = value.const_value.numpy().astype(np.float32)
    params = activation_params(min(float(array.min()), 0.0), max(float(array.max()), 0.0), config)
    q = np.clip(np.round(array / params.scale) + params.zero_point, params.qmin, params.qmax).astype(params.dtype)
    scale, zero = np.array(params.scale, np.float32), np.array(params.zero_point, params.dtype)
    _read_through_dequantize(graph, node, index, f"{node.name or value.name}_input{index}", (q, scale, zero), 0, names)


def _read_through_dequantize(
    graph: ir.Graph,
    node: ir.Node,
    index: int,
    prefix: str,
    quantized: tuple[np.ndarray, np.ndarray, np.ndarray],
    axis: int,
    names: UniqueNames,
) -> None:
    """Make input ``index`` of ``node`` a DequantizeLinear of the (integers, scale, zero point) in ``quantized``,
    stored as ``<prefix>_quantized`` / ``_scale`` / ``_zero_point``; per ``axis`` when the scale is a vector."""
    values = [add_initializer(graph, f"{prefix}_{role}", array, names)
              for role, array in zip(("quantized", "scale", "zero_point"), quantized, strict=True)]  # fmt: skip
    attributes = [ir.AttrInt64("axis", axis)] if quantized[1].ndim else []
    dequantize = ir.Node("", "DequantizeLinear", values, attributes=attributes, name=f"{prefix}_dq")
    graph.insert_before(node, dequantize)
    node.replace_input_with(index, dequantize.outputs[0])


def _quantized_weight(
    node: ir.Node, axis: int, config: QuantizeInt8Config, mean: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """``node``'s int8 weight, scale and zero point, and the output shift its rounding causes given ``mean``."""
    array = node.inputs[1].const_value.numpy().astype(np.float32)
    q, scale, zero = quantize_weight(array, axis, config)
    shift = None
    if mean is not None and node.op_type in BIAS_CORRECTED_OPS:
        shape = [1] * array.ndim
        shape[axis] = -1
        # float32 suffices: |q - zero| < 2^8 times a float16-exact scale (`half_exact`) is exact, sums run in float64.
        dequantized = (q.astype(np.float32) - zero.reshape(shape)) * scale.reshape(shape)
        shift = output_shift(node, dequantized - array, mean)
    return q, scale, zero, shift
