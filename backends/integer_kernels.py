"""Integer kernels of the reference backend, on exact fixed-point values.

A `Fixed` is an exact real tensor ``mantissas * multiplier * 2**exponent / divisor``
with int64 mantissas: what a DequantizeLinear hands to the next op, and what that
op's integer arithmetic produces before the QuantizeLinear after it rounds it back
(`requantize`). DFP tensors have multiplier 1 (power-of-two scales); an int8 tensor's
scale is a float32, i.e. its 24-bit significand as the multiplier and an exponent.
Every kernel is exact: products and sums of mantissas, exponents aligned by left
shifts, averages kept as a divisor. The only rounding is `requantize`'s (nearest,
ties to even): exact for DFP, and through a 30-bit fixed-point multiplier for int8,
as integer int8 targets requantize. Conv and Gemm/MatMul accumulate integer products
in int32 over chunks that cannot overflow (`compressor.quantization.dfp`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from compressor.quantization import dfp

SHIFT_BITS_MAX = 62  # int64 holds mantissas shifted up to here
MULTIPLIER_BITS = 30  # int8 requantization: the real ratio as a 30-bit integer and a shift
MIN_MULTIPLIER_BITS = 16  # fewer would move results by more than a step


class KernelError(ValueError):
    """An input the integer kernels cannot compute exactly (named by the reference with its node)."""


@dataclass(frozen=True)
class Fixed:
    """The exact value ``mantissas * multiplier * 2**exponent / divisor`` (the last three broadcast)."""

    mantissas: np.ndarray
    exponent: np.ndarray
    divisor: np.ndarray
    multiplier: np.ndarray = field(default_factory=lambda: np.ones((), np.int64))

    @classmethod
    def of(
        cls,
        mantissas: np.ndarray,
        exponent: np.ndarray | int,
        divisor: np.ndarray | int = 1,
        multiplier: np.ndarray | int = 1,
    ) -> Fixed:
        as_int = [np.asarray(a, np.int64) for a in (mantissas, exponent, divisor, multiplier)]
        return cls(*as_int)

    @classmethod
    def from_float(cls, values: np.ndarray) -> Fixed:
        """A float32 constant (a Clip bound) as an exact fixed-point value."""
        fraction, exponent = np.frexp(np.asarray(values, np.float32).astype(np.float64))
        return cls.of(np.rint(fraction * 2**24).astype(np.int64), exponent.astype(np.int64) - 24)

    @property
    def unit(self) -> np.ndarray:
        """The real value of one mantissa step (float64, for comparisons only)."""
        return self.multiplier * np.exp2(self.exponent.astype(np.float64)) / self.divisor

    def real(self) -> np.ndarray:
        return self.mantissas * self.unit

    @property
    def uniform(self) -> bool:
        """One scale for the whole tensor (data movement keeps its meaning)."""
        return self.exponent.size == 1 and self.divisor.size == 1 and self.multiplier.size == 1

    def with_mantissas(self, mantissas: np.ndarray) -> Fixed:
        return Fixed(mantissas, self.exponent, self.divisor, self.multiplier)

    def map(self, move: callable) -> Fixed:  # type: ignore[valid-type]
        """Data movement: ``move`` applied to the mantissas (needs one scale for the tensor)."""
        if not self.uniform:
            raise KernelError("data movement of a tensor with per-channel scales")
        scale = (self.exponent.reshape(()), self.divisor.reshape(()), self.multiplier.reshape(()))
        return Fixed(move(self.mantissas), *scale)


def aligned(values: list[Fixed]) -> tuple[list[np.ndarray], np.ndarray]:
    """The mantissas of ``values`` at one common scale (multiplier 1, the smallest exponent), exactly.

    Divisors must be 1. Multipliers are folded into the mantissas first (int8 scales differ).
    """
    if any(np.any(v.divisor != 1) for v in values):
        raise KernelError("adding an average that was not requantized first")
    exponent = values[0].exponent
    for value in values[1:]:
        exponent = np.minimum(exponent, value.exponent)
    return [_shift_left(_folded(v), v.exponent - exponent) for v in values], exponent


def _folded(value: Fixed) -> np.ndarray:
    if np.all(value.multiplier == 1):
        return value.mantissas
    bits = np.abs(value.mantissas).max(initial=0).item().bit_length() + int(value.multiplier.max()).bit_length()
    if bits > SHIFT_BITS_MAX:
        raise KernelError(f"folding a scale multiplier needs {bits} bits, beyond int64")
    return value.mantissas * value.multiplier


def _shift_left(mantissas: np.ndarray, shift: np.ndarray) -> np.ndarray:
    if np.any(shift < 0):
        raise KernelError("negative alignment shift")
    bits = np.abs(mantissas).max(initial=0).item().bit_length() + int(shift.max(initial=0))
    if bits > SHIFT_BITS_MAX:
        raise KernelError(f"aligning exponents needs {bits} bits, beyond int64")
    return np.left_shift(mantissas, shift)


def requantize(
    value: Fixed, exponent: np.ndarray, dtype: type[np.integer], multiplier: np.ndarray | int = 1, zero: int = 0
) -> tuple[np.ndarray, int]:
    """``value`` in steps of ``multiplier * 2**exponent``, rounded to nearest even, plus ``zero``, saturated to
    ``dtype``; also the saturation count. Exact when both scales are powers of two (DFP); otherwise through
    a fixed-point multiplier (int8)."""
    multiplier = np.asarray(multiplier, np.int64)
    if np.any(value.multiplier != 1) or np.any(multiplier != 1):
        rounded = _fixed_point(value, exponent, multiplier)
    else:
        rounded = _exact(value, exponent)
    rounded = rounded + zero
    info = np.iinfo(dtype)
    clipped = int(np.count_nonzero((rounded < info.min) | (rounded > info.max)))
    return np.clip(rounded, info.min, info.max).astype(dtype), clipped


def _fixed_point(value: Fixed, exponent: np.ndarray, multiplier: np.ndarray) -> np.ndarray:
    """round(m * ratio) with the real ratio of the two scales as a 30-bit integer and a power of two."""
    ratio = value.multiplier / (value.divisor * multiplier.astype(np.float64)) * np.exp2(
        (value.exponent - exponent).astype(np.float64)
    )
    fraction, power = np.frexp(ratio)  # ratio = fraction * 2**power, fraction in [0.5, 1)
    # As many multiplier bits as int64 leaves beside the mantissas, at most 30 (an int32 multiplier).
    bits = min(MULTIPLIER_BITS, SHIFT_BITS_MAX - np.abs(value.mantissas).max(initial=0).item().bit_length())
    if bits < MIN_MULTIPLIER_BITS:
        raise KernelError(f"requantizing leaves {bits} multiplier bits in int64")
    scaled = np.rint(fraction * 2**bits).astype(np.int64)
    shift = bits - power.astype(np.int64)
    if np.any(shift < 1) or np.any(shift > SHIFT_BITS_MAX):  # a ratio >= 2**(bits - 1), or vanishing
        raise KernelError(f"requantization ratio {float(np.max(ratio)):g} out of range")
    return dfp.round_divide(value.mantissas * scaled, np.left_shift(1, shift))


def _exact(value: Fixed, exponent: np.ndarray) -> np.ndarray:
    shift = value.exponent - exponent
    up = np.minimum(np.maximum(shift, 0), 46)
    # Shifting up, |m| >= divisor * 2**16 / 2**up saturates whatever it is: clip it there so the shift cannot overflow.
    limit = -(-np.left_shift(value.divisor, 16) >> up)
    mantissas = np.where(up > 0, np.clip(value.mantissas, -limit, limit), value.mantissas)
    numerator = _shift_left(mantissas, up)
    down = np.maximum(-shift, 0)
    # Shifting down by more than the numerator has bits (channels of near-zero weights at the finest
    # exponent), the quotient is below 1/4 in magnitude: exactly 0 after rounding.
    vanishing = down > np.abs(numerator).max(initial=0).item().bit_length() + 1
    down = np.where(vanishing, 0, down)
    if int(value.divisor.max()).bit_length() + int(down.max(initial=0)) > SHIFT_BITS_MAX:
        raise KernelError("requantization shift beyond int64")
    return np.where(vanishing, 0, dfp.round_divide(numerator, np.left_shift(value.divisor, down)))


def add(a: Fixed, b: Fixed, subtract: bool = False) -> Fixed:
    (ma, mb), exponent = aligned([a, b])
    return Fixed.of(ma - mb if subtract else ma + mb, exponent)


def multiply(a: Fixed, b: Fixed) -> Fixed:
    scale = (a.exponent + b.exponent, a.divisor * b.divisor, a.multiplier * b.multiplier)
    return Fixed.of(a.mantissas * b.mantissas, *scale)


def clip(value: Fixed, low: Fixed | None, high: Fixed | None) -> Fixed:
    """Clip with bounds as exact values (Relu: low = 0).

    On a scaled accumulator (int8: multiplier != 1) the bounds become the nearest whole steps inside
    them, which moves a clipped value by less than one accumulator step.
    """
    if np.any(value.multiplier != 1) or np.any(value.divisor != 1):
        unit = value.unit
        result = value.mantissas
        if low is not None:
            result = np.maximum(result, np.ceil(low.real() / unit).astype(np.int64))
        if high is not None:
            result = np.minimum(result, np.floor(high.real() / unit).astype(np.int64))
        return value.with_mantissas(result)
    bounds = [b for b in (low, high) if b is not None]
    mantissas, exponent = aligned([value, *bounds])
    result = mantissas[0]
    if low is not None:
        result = np.maximum(result, mantissas[1])
    if high is not None:
        result = np.minimum(result, mantissas[-1])
    return Fixed.of(result, exponent)


def relu(value: Fixed) -> Fixed:
    return value.with_mantissas(np.maximum(value.mantissas, 0))


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
    channel = (1, -1, *([1] * len(out_shape)))
    exponent = (x.exponent + w.exponent.reshape(-1)).reshape(channel)
    multiplier = (x.multiplier * np.broadcast_to(w.multiplier, w.exponent.shape).reshape(-1)).reshape(channel)
    return _with_bias(Fixed.of(result, exponent, 1, multiplier), bias, 1, result.ndim)


def matmul(a: Fixed, b: Fixed, bias: Fixed | None, chunk: int | None, stats: dfp.AccumulatorStats) -> Fixed:
    """[..., K] @ [K, N] with a per-column exponent on ``b`` (from its DequantizeLinear axis)."""
    if not a.uniform or np.any(a.divisor != 1):
        raise KernelError("MatMul/Gemm input must have one exponent and no pending division")
    lead = a.mantissas.shape[:-1]
    length = b.mantissas.shape[0] if chunk is None else chunk
    total = dfp.chunked_matmul(a.mantissas.reshape(-1, a.mantissas.shape[-1]), b.mantissas, length, stats)
    total = total.reshape(*lead, -1)
    exponent = np.broadcast_to(b.exponent, b.mantissas.shape)[0] + a.exponent.reshape(())
    multiplier = np.broadcast_to(b.multiplier, b.mantissas.shape)[0] * a.multiplier.reshape(())
    return _with_bias(Fixed.of(total, exponent, 1, multiplier), bias, total.ndim - 1, total.ndim)


def _with_bias(value: Fixed, bias: Fixed | None, axis: int, ndim: int) -> Fixed:
    """The accumulator plus the bias: added as integers where the bias is stored in accumulator steps
    (int8's contract: bias scale = input scale x weight scale, rounded to float32), else aligned exactly."""
    if bias is None:
        return value
    shape = [1] * ndim
    shape[axis] = -1
    per_channel = [np.broadcast_to(a, bias.mantissas.shape).reshape(shape) for a in (bias.exponent, bias.multiplier)]
    stored = Fixed.of(bias.mantissas.reshape(shape), per_channel[0], 1, per_channel[1])
    if np.all(value.divisor == 1) and np.allclose(stored.unit, value.unit, rtol=2.0**-22, atol=0):
        return value.with_mantissas(value.mantissas + stored.mantissas)
    return add(value, stored)


def max_pool(x: Fixed, window: Window) -> Fixed:
    patches = window.patches(x.mantissas, np.iinfo(np.int64).min)
    spatial = len(window.kernel)
    return x.with_mantissas(patches.max(axis=tuple(range(-spatial, 0))))


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
    return Fixed.of(sums, x.exponent, counts, x.multiplier)


def global_average_pool(x: Fixed) -> Fixed:
    if np.any(x.divisor != 1):
        raise KernelError("GlobalAveragePool of an average that was not requantized first")
    axes = tuple(range(2, x.mantissas.ndim))
    count = int(np.prod([x.mantissas.shape[a] for a in axes]))
    return Fixed.of(x.mantissas.sum(axis=axes, keepdims=True), x.exponent, count, x.multiplier)
