"""INT16 dynamic fixed point (Das et al. 2018): int16 mantissas sharing a power-of-two exponent.

A DFP tensor holds ``real = mantissa * 2**exponent`` with int16 mantissas and one
exponent per tensor (weights: optionally one per output channel). The exponent is
the smallest one at which the largest magnitude still fits, so that value uses
the full int16 range and no power of two finer would hold it.

The arithmetic here is what a 16-bit fixed-point target computes:
- rounding to nearest, ties to even, then saturation to int16 (`to_mantissas`;
  `round_divide` for exact rational rounding);
- int16 x int16 products summed in an int32 accumulator, over chunks of the
  reduction short enough that no partial sum can overflow (`chunk_length`),
  the chunk sums then combined in int64 (`chunked_matmul`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compressor.errors import ModelError

MANTISSA_MIN, MANTISSA_MAX = -(2**15), 2**15 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
ACTIVATION_LIMIT = 2**15  # largest |mantissa| an int16 activation can carry (-32768)
# float32 holds 2**e as a normal number for e in [-126, 127]; a scale outside that cannot be written.
EXPONENT_MIN, EXPONENT_MAX = -126, 127


def exponent_for(max_abs: float | np.ndarray, what: str = "tensor") -> np.ndarray:
    """The smallest exponent ``e`` with ``max_abs / 2**e <= MANTISSA_MAX`` (elementwise).

    Raises `ModelError` naming ``what`` when a magnitude is zero, infinite or NaN,
    or its exponent falls outside what a float32 scale can hold.
    """
    magnitude = np.asarray(max_abs, dtype=np.float64)
    if not np.all(np.isfinite(magnitude)) or np.any(magnitude <= 0):
        bad = magnitude[~np.isfinite(magnitude) | (magnitude <= 0)].flat[0]
        raise ModelError(
            f"int16: {what} has a calibrated magnitude of {bad}, so no exponent represents it; "
            "calibrate on data that exercises it, or keep its node in float (keep_float)"
        )
    exponent = np.ceil(np.log2(magnitude / MANTISSA_MAX)).astype(np.int64)
    # log2 rounding can land one off at exact powers: step to the smallest exponent that holds the value.
    exponent = np.where(magnitude / np.exp2(exponent - 1) <= MANTISSA_MAX, exponent - 1, exponent)
    exponent = np.where(magnitude / np.exp2(exponent) > MANTISSA_MAX, exponent + 1, exponent)
    outside = (exponent < EXPONENT_MIN) | (exponent > EXPONENT_MAX)
    if np.any(outside):
        raise ModelError(
            f"int16: {what} needs exponent {int(exponent[outside].flat[0])}, outside a float32 scale's "
            f"[{EXPONENT_MIN}, {EXPONENT_MAX}]; its values are too large or too small to represent"
        )
    return exponent


def weight_exponents(weight: np.ndarray, axis: int | None, what: str) -> np.ndarray:
    """One exponent per slice along ``axis`` (None: one for the tensor), from max |w|.

    All-zero slices (pruned channels) take the tensor's exponent; an all-zero tensor takes 0. Slices
    so small that every mantissa rounds to zero at the finest float32 scale take that scale.
    """
    finest = MANTISSA_MAX * 2.0**EXPONENT_MIN
    overall = float(np.abs(weight).max()) if weight.size else 0.0
    if overall < finest:
        return np.zeros(() if axis is None else (weight.shape[axis],), np.int64)
    whole = exponent_for(overall, what)
    if axis is None:
        return whole
    reduce = tuple(i for i in range(weight.ndim) if i != axis)
    per_slice = np.abs(weight).max(axis=reduce) if reduce else np.abs(weight)
    safe = np.where(per_slice > 0, np.maximum(per_slice, finest), overall)
    return exponent_for(safe, what)


def to_mantissas(values: np.ndarray, exponent: np.ndarray | int, axis: int | None = None) -> np.ndarray:
    """``values / 2**exponent`` rounded to nearest even and saturated to int16 (as ONNX QuantizeLinear does).

    ``exponent`` is a scalar, or one per slice along ``axis``.
    """
    scale = np.exp2(np.asarray(exponent, dtype=np.float64))
    if axis is not None and scale.ndim:
        scale = scale.reshape([-1 if i == axis else 1 for i in range(values.ndim)])
    scaled = np.rint(np.asarray(values, dtype=np.float64) / scale)  # dividing by a power of two is exact
    return np.clip(scaled, MANTISSA_MIN, MANTISSA_MAX).astype(np.int16)


def round_divide(numerator: np.ndarray, denominator: np.ndarray | int) -> np.ndarray:
    """``numerator / denominator`` rounded to nearest, ties to even, in exact int64 arithmetic (denominator > 0)."""
    numerator = np.asarray(numerator, dtype=np.int64)
    denominator = np.asarray(denominator, dtype=np.int64)
    quotient, remainder = np.divmod(numerator, denominator)  # floor division: 0 <= remainder < denominator
    twice = 2 * remainder
    up = (twice > denominator) | ((twice == denominator) & (quotient % 2 == 1))
    return quotient + up


def chunk_length(weights: np.ndarray, activation_limit: int = ACTIVATION_LIMIT) -> int:
    """The longest chunk of a reduction whose int32 partial sums provably cannot overflow.

    ``weights`` is [reduction, outputs] of int16 mantissas, reduced over axis 0 in order.
    With |x| <= ``activation_limit`` (int16 activations), a chunk's partial sum for an
    output is bounded by ``activation_limit * sum(|w|)`` over the chunk; the chunk length
    is the largest one for which that bound fits int32 for every output and every chunk.
    The operands' bit widths alone (|w| <= max |w|) give at least
    ``INT32_MAX // (activation_limit * max|w|)`` (2 at full int16 range), which the
    weights' actual magnitudes usually lengthen.
    """
    magnitudes = np.abs(weights.astype(np.int64))
    length = magnitudes.shape[0]
    budget = INT32_MAX // activation_limit
    largest = int(magnitudes.max()) if magnitudes.size else 0
    if largest == 0 or largest * length <= budget:
        return max(length, 1)
    by_bits = max(budget // largest, 1)
    low, high = by_bits, length  # low always fits; find the longest fitting length by bisection
    while low < high:
        middle = (low + high + 1) // 2
        if _chunks_fit(magnitudes, middle, budget):
            low = middle
        else:
            high = middle - 1
    return low


def _chunks_fit(magnitudes: np.ndarray, length: int, budget: int) -> bool:
    total = np.concatenate([np.zeros((1, magnitudes.shape[1]), np.int64), np.cumsum(magnitudes, axis=0)])
    ends = np.minimum(np.arange(length, magnitudes.shape[0] + length, length), magnitudes.shape[0])
    starts = np.arange(0, magnitudes.shape[0], length)
    return bool(np.all(total[ends] - total[starts] <= budget))


@dataclass
class AccumulatorStats:
    """What the int32 accumulators met: chunk partial sums that overflowed, and the chunks summed."""

    overflows: int = 0
    chunks: int = 0

    def add(self, other: AccumulatorStats) -> None:
        self.overflows += other.overflows
        self.chunks += other.chunks


def chunked_matmul(
    x: np.ndarray, w: np.ndarray, length: int, stats: AccumulatorStats | None = None
) -> np.ndarray:
    """``x @ w`` for int16 mantissas ``x`` [..., M, K] and ``w`` [..., K, N], in int32 chunks of ``length``.

    Each chunk's partial sum is what an int32 accumulator holds: it wraps modulo 2**32 on
    overflow (counted in ``stats``). The chunk sums are then added in int64 (exact).
    Chunk sums are computed with float64 products, which are exact here: every product is at
    most 2**30 and every partial sum, overflowing or not, at most ``length * 2**30 < 2**53``.
    """
    if length < 1 or length >= 2**23:
        raise ValueError(f"chunk length {length} outside [1, 2**23)")
    stats = stats if stats is not None else AccumulatorStats()
    xf, wf = x.astype(np.float64), w.astype(np.float64)
    total = np.zeros((*np.broadcast_shapes(x.shape[:-2], w.shape[:-2]), x.shape[-2], w.shape[-1]), np.int64)
    for start in range(0, x.shape[-1], length):
        partial = (xf[..., start : start + length] @ wf[..., start : start + length, :]).astype(np.int64)
        outside = (partial < INT32_MIN) | (partial > INT32_MAX)
        count = int(np.count_nonzero(outside))
        if count:
            stats.overflows += count
            partial = (partial - INT32_MIN) % 2**32 + INT32_MIN  # what a wrapping int32 register holds
        stats.chunks += 1
        total += partial
    return total
