"""Integer kernels of the reference backend, on exact fixed-point values.

A `Fixed` is an exact real tensor ``mantissas * 2**exponent / divisor`` with int64
mantissas: what a DequantizeLinear of a DFP tensor hands to the next op, and what
that op's integer arithmetic produces before the QuantizeLinear after it rounds
it back to int16 (`requantize`). Every kernel is exact: products and sums of
mantissas, exponents aligned by left shifts, averages kept as a divisor, and the
only rounding is `requantize`'s (nearest, ties to even). Conv and Gemm/MatMul
accumulate int16 x int16 products in int32 over chunks that cannot overflow
(`compressor.quantization.dfp`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from compressor.quantization import dfp

SHIFT_BITS_MAX = 62  # int64 holds mantissas shifted up to here


class KernelError(ValueError):
    """An input the integer kernels cannot compute exactly (named by the reference with its node)."""


@dataclass(frozen=True)
class Fixed:
    """The exact value ``mantissas * 2**exponent / divisor``; exponent and divisor broadcast against mantissas."""

    mantissas: np.ndarray
    exponent: np.ndarray
    divisor: np.ndarray

    @classmethod
    def of(cls, mantissas: np.ndarray, exponent: np.ndarray | int, divisor: np.ndarray | int = 1) -> Fixed:
        return cls(np.asarray(mantissas, np.int64), np.asarray(exponent, np.int64), np.asarray(divisor, np.int64))

    @classmethod
    def from_float(cls, values: np.ndarray) -> Fixed:
        """A float32 constant (a Clip bound) as an exact fixed-point value."""
        fraction, exponent = np.frexp(np.asarray(values, np.float32).astype(np.float64))
        return cls.of(np.rint(fraction * 2**24).astype(np.int64), exponent.astype(np.int64) - 24)

    def real(self) -> np.ndarray:
        return self.mantissas * np.exp2(self.exponent.astype(np.float64)) / self.divisor

    @property
    def uniform(self) -> bool:
        """One exponent and divisor for the whole tensor (data movement keeps its meaning)."""
        return self.exponent.size == 1 and self.divisor.size == 1

    def map(self, move: callable) -> Fixed:  # type: ignore[valid-type]
        """Data movement: ``move`` applied to the mantissas (needs one exponent and divisor)."""
        if not self.uniform:
            raise KernelError("data movement of a tensor with per-channel exponents")
        return Fixed(move(self.mantissas), self.exponent.reshape(()), self.divisor.reshape(()))


def aligned(values: list[Fixed]) -> tuple[list[np.ndarray], np.ndarray]:
    """The mantissas of ``values`` at their common (smallest) exponent, exactly; divisors must be 1."""
    if any(np.any(v.divisor != 1) for v in values):
        raise KernelError("adding an average that was not requantized first")
    exponent = values[0].exponent
    for value in values[1:]:
        exponent = np.minimum(exponent, value.exponent)
    return [_shift_left(v.mantissas, v.exponent - exponent) for v in values], exponent


def _shift_left(mantissas: np.ndarray, shift: np.ndarray) -> np.ndarray:
    if np.any(shift < 0):
        raise KernelError("negative alignment shift")
    bits = np.abs(mantissas).max(initial=0).item().bit_length() + int(shift.max(initial=0))
    if bits > SHIFT_BITS_MAX:
        raise KernelError(f"aligning exponents needs {bits} bits, beyond int64")
    return np.left_shift(mantissas, shift)


def requantize(value: Fixed, exponent: np.ndarray, dtype: type[np.integer]) -> tuple[np.ndarray, int]:
    """``value`` at ``exponent`` rounded to nearest even and saturated to ``dtype``; also the saturation count."""
    shift = value.exponent - exponent
    if np.any(-shift > SHIFT_BITS_MAX - 16):
        raise KernelError("requantization shift beyond int64")
    up = np.minimum(np.maximum(shift, 0), 46)
    # Shifting up, |m| >= divisor * 2**16 / 2**up saturates whatever it is: clip it there so the shift cannot overflow.
    limit = -(-np.left_shift(value.divisor, 16) >> up)
    mantissas = np.where(up > 0, np.clip(value.mantissas, -limit, limit), value.mantissas)
    numerator = _shift_left(mantissas, up)
    denominator = np.left_shift(value.divisor, np.maximum(-shift, 0))
    rounded = dfp.round_divide(numerator, denominator)
    info = np.iinfo(dtype)
    clipped = int(np.count_nonzero((rounded < info.min) | (rounded > info.max)))
    return np.clip(rounded, info.min, info.max).astype(dtype), clipped


def add(a: Fixed, b: Fixed, subtract: bool = False) -> Fixed:
    (ma, mb), exponent = aligned([a, b])
    return Fixed.of(ma - mb if subtract else ma + mb, exponent)


def multiply(a: Fixed, b: Fixed) -> Fixed:
    return Fixed.of(a.mantissas * b.mantissas, a.exponent + b.exponent, a.divisor * b.divisor)


def clip(value: Fixed, low: Fixed | None, high: Fixed | None) -> Fixed:
    """Clip with bounds as exact values (Relu: low = 0)."""
    bounds = [b for b in (low, high) if b is not None]
    mantissas, exponent = aligned([value, *bounds])
    result = mantissas[0]
    if low is not None:
        result = np.maximum(result, mantissas[1])
    if high is not None:
        result = np.minimum(result, mantissas[-1])
    return Fixed.of(result, exponent)


def relu(value: Fixed) -> Fixed:
    return Fixed(np.maximum(value.mantissas, 0), value.exponent, value.divisor)


def concat(values: list[Fixed], axis: int) -> Fixed:
    if not all(v.uniform for v in values):
        raise KernelError("Concat of tensors with per-channel exponents")
    mantissas, exponent = aligned(values)
    return Fixed.of(np.concatenate(mantissas, axis=axis), exponent.reshape(()))


@dataclass(frozen=True)
class Window:
    """Sliding-window geometry of a Conv or pool over NCHW (any number of spatial dims)."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]  # begins then ends, as ONNX writes them
    dilations: tuple[int, ...]

    def patches(self, x: np.ndarray, fill: int) -> np.ndarray:
        """[N, C, *out, *kernel] views of ``x`` padded with ``fill``."""
        spatial = len(self.kernel)
        widths = [(0, 0), (0, 0)] + [(self.pads[i], self.pads[i + spatial]) for i in range(spatial)]
        padded = np.pad(x, widths, constant_values=fill)
        extent = tuple((k - 1) * d + 1 for k, d in zip(self.kernel, self.dilations, strict=True))
        views = sliding_window_view(padded, extent, axis=tuple(range(2, 2 + spatial)))
        index = (slice(None), slice(None))
        index += tuple(slice(None, None, s) for s in self.strides)
        index += tuple(slice(None, None, d) for d in self.dilations)
        return views[index]


def conv(
    x: Fixed, w: Fixed, bias: Fixed | None, window: Window, groups: int, chunk: int | None, stats: dfp.AccumulatorStats
) -> Fixed:
    """Grouped N-d convolution: int16 products in chunked int32 accumulators, then int64.

    ``chunk`` is the reduction chunk length (None: the whole reduction, i.e. no chunking).
    The reduction runs over (input channel, kernel position), in that order.
    """
    if not x.uniform or np.any(x.divisor != 1):
        raise KernelError("Conv input must have one exponent and no pending division")
    out_channels = w.mantissas.shape[0]
    patches = window.patches(x.mantissas, 0)  # [N, C, *out, *k]
    n, channels = patches.shape[:2]
    out_shape = patches.shape[2 : 2 + len(window.kernel)]
    per_group = channels // groups
    # [N, groups, positions, per_group * k] against [groups, per_group * k, out per group]
    moved = np.moveaxis(patches, 1, 1 + len(out_shape))  # [N, *out, C, *k]
    columns = moved.reshape(n, -1, groups, per_group * int(np.prod(window.kernel)))
    columns = np.moveaxis(columns, 2, 1)
    weights = w.mantissas.reshape(groups, out_channels // groups, -1).transpose(0, 2, 1)
    length = weights.shape[1] if chunk is None else chunk
    total = dfp.chunked_matmul(columns, weights[None], length, stats)  # [N, groups, positions, out per group]
    total = np.moveaxis(total, 1, 2).reshape(n, -1, out_channels)
    result = np.moveaxis(total, 1, 2).reshape(n, out_channels, *out_shape)
    exponent = (x.exponent + w.exponent.reshape(-1)).reshape(1, -1, *([1] * len(out_shape)))
    return _with_bias(Fixed.of(result, exponent), bias, 1, result.ndim)


def matmul(a: Fixed, b: Fixed, bias: Fixed | None, chunk: int | None, stats: dfp.AccumulatorStats) -> Fixed:
    """[..., K] @ [K, N] with a per-column exponent on ``b`` (from its DequantizeLinear axis)."""
    if not a.uniform or np.any(a.divisor != 1):
        raise KernelError("MatMul/Gemm input must have one exponent and no pending division")
    lead = a.mantissas.shape[:-1]
    length = b.mantissas.shape[0] if chunk is None else chunk
    total = dfp.chunked_matmul(a.mantissas.reshape(-1, a.mantissas.shape[-1]), b.mantissas, length, stats)
    total = total.reshape(*lead, -1)
    exponent = np.broadcast_to(b.exponent, b.mantissas.shape)[0] + a.exponent.reshape(())
    return _with_bias(Fixed.of(total, exponent), bias, total.ndim - 1, total.ndim)


def _with_bias(value: Fixed, bias: Fixed | None, axis: int, ndim: int) -> Fixed:
    if bias is None:
        return value
    shape = [1] * ndim
    shape[axis] = -1
    flat = np.broadcast_to(bias.exponent, bias.mantissas.shape).reshape(shape)
    return add(value, Fixed.of(bias.mantissas.reshape(shape), flat))


def max_pool(x: Fixed, window: Window) -> Fixed:
    patches = window.patches(x.mantissas, np.iinfo(np.int64).min)
    spatial = len(window.kernel)
    result = patches.max(axis=tuple(range(-spatial, 0)))
    return Fixed(result, x.exponent, x.divisor)


def average_pool(x: Fixed, window: Window, count_include_pad: bool) -> Fixed:
    """The window sums, exact, with the element counts kept as the divisor."""
    if np.any(x.divisor != 1):
        raise KernelError("AveragePool of an average that was not requantized first")
    spatial = len(window.kernel)
    axes = tuple(range(-spatial, 0))
    sums = window.patches(x.mantissas, 0).sum(axis=axes)
    if count_include_pad:
        counts = np.asarray(int(np.prod(window.kernel)), np.int64)
    else:
        ones = np.ones((1, 1, *x.mantissas.shape[2:]), np.int64)
        counts = window.patches(ones, 0).sum(axis=axes)
    return Fixed.of(sums, x.exponent, counts)


def global_average_pool(x: Fixed) -> Fixed:
    if np.any(x.divisor != 1):
        raise KernelError("GlobalAveragePool of an average that was not requantized first")
    axes = tuple(range(2, x.mantissas.ndim))
    count = int(np.prod([x.mantissas.shape[a] for a in axes]))
    return Fixed.of(x.mantissas.sum(axis=axes, keepdims=True), x.exponent, count)
