"""INT16 dynamic-fixed-point arithmetic against exact integer (and rational) arithmetic."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from compressor.backends import integer_kernels as k
from compressor.errors import ModelError
from compressor.quantization import dfp

EXTREMES = st.sampled_from([dfp.MANTISSA_MIN, dfp.MANTISSA_MAX, -dfp.MANTISSA_MAX, 0])
MANTISSAS = st.one_of(EXTREMES, st.integers(-(2**15), 2**15 - 1))


def test_exponent_uses_the_full_int16_range() -> None:
    for magnitude in (1e-6, 0.3, 1.0, 6.0, 32767.0, 32768.0, 1e9):
        e = int(dfp.exponent_for(magnitude))
        assert magnitude / 2.0**e <= dfp.MANTISSA_MAX
        assert magnitude / 2.0 ** (e - 1) > dfp.MANTISSA_MAX  # one exponent finer would not hold it
    assert int(dfp.exponent_for(32767.0)) == 0


@pytest.mark.parametrize("bad", [0.0, np.inf, np.nan])
def test_exponent_of_a_degenerate_range_names_the_tensor(bad: float) -> None:
    with pytest.raises(ModelError, match="tensor 'conv1_out'"):
        dfp.exponent_for(bad, "tensor 'conv1_out'")


def test_exponent_outside_a_float32_scale_is_an_error() -> None:
    with pytest.raises(ModelError, match="outside a float32 scale"):
        dfp.exponent_for(1e-42, "tensor 'tiny'")


def test_rounding_is_to_nearest_even_and_saturates() -> None:
    values = np.array([2.5, 3.5, -2.5, -3.5, 0.5, 1.5, 1e9, -1e9], np.float32)
    assert dfp.to_mantissas(values, 0).tolist() == [2, 4, -2, -4, 0, 2, 32767, -32768]
    per_channel = dfp.to_mantissas(np.array([[3.0, 3.0], [3.0, 3.0]]), np.array([0, 1]), axis=0)
    assert per_channel.tolist() == [[3, 3], [2, 2]]  # 1.5 rounds to 2 (even)


def test_weight_exponents_per_channel_and_pruned_channels() -> None:
    weight = np.array([[1.0, -2.0], [0.0, 0.0], [100.0, 3.0]], np.float32)
    exponents = dfp.weight_exponents(weight, 0, "w")
    assert exponents[0] == dfp.exponent_for(2.0) and exponents[2] == dfp.exponent_for(100.0)
    assert exponents[1] == dfp.exponent_for(100.0)  # all-zero channel: the tensor's exponent
    assert dfp.weight_exponents(np.zeros((2, 2)), 0, "w").tolist() == [0, 0]


@settings(max_examples=300, deadline=None)
@given(st.integers(-(2**40), 2**40), st.integers(1, 2**20))
def test_round_divide_matches_exact_rationals(numerator: int, denominator: int) -> None:
    exact = Fraction(numerator, denominator)
    assert int(dfp.round_divide(np.int64(numerator), denominator)) == round(exact)  # Python rounds ties to even


@settings(max_examples=200, deadline=None)
@given(st.integers(-(2**31), 2**31), st.integers(-20, 20), st.integers(-20, 20), st.integers(1, 9))
def test_requantize_matches_exact_rationals(mantissa: int, source: int, target: int, divisor: int) -> None:
    exact = Fraction(mantissa, divisor) * Fraction(2) ** (source - target)
    expected = max(min(round(exact), dfp.MANTISSA_MAX), dfp.MANTISSA_MIN)
    got, clipped = k.requantize(k.Fixed.of(np.array([mantissa]), source, divisor), np.asarray(target), np.int16)
    assert int(got[0]) == expected and clipped == int(expected != round(exact))


def test_alignment_beyond_int64_is_an_error_not_a_wrap() -> None:
    with pytest.raises(k.KernelError, match="beyond int64"):
        k.add(k.Fixed.of(np.array([2**40]), 30), k.Fixed.of(np.array([1]), 0))


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_chunked_accumulation_is_exact_and_never_overflows(data: st.DataObject) -> None:
    rows, depth, cols = (data.draw(st.integers(1, n)) for n in (4, 300, 5))
    w = data.draw(hnp.arrays(np.int64, (depth, cols), elements=MANTISSAS))
    x = data.draw(hnp.arrays(np.int64, (rows, depth), elements=MANTISSAS))
    if data.draw(st.booleans()):  # worst case for these weights: every product at its largest
        x = np.where(w[:, :1].T >= 0, dfp.MANTISSA_MAX, dfp.MANTISSA_MIN).repeat(rows, axis=0)
    length = dfp.chunk_length(w)
    assert length >= min(depth, max(dfp.INT32_MAX // (dfp.ACTIVATION_LIMIT * max(int(np.abs(w).max()), 1)), 1))
    # The bound the chunk length rests on: no chunk's partial sum can leave int32 for any |x| <= 2**15.
    for start in range(0, depth, length):
        assert (np.abs(w[start : start + length]).sum(axis=0) * dfp.ACTIVATION_LIMIT <= dfp.INT32_MAX).all()
    stats = dfp.AccumulatorStats()
    got = dfp.chunked_matmul(x, w, length, stats)
    exact = [[sum(int(a) * int(b) for a, b in zip(row, column, strict=True)) for column in w.T] for row in x]
    assert got.tolist() == exact
    assert stats.overflows == 0


def test_whole_reductions_overflow_int32_on_adversarial_inputs() -> None:
    w = np.full((64, 3), dfp.MANTISSA_MAX, np.int64)
    x = np.full((1, 64), dfp.MANTISSA_MAX, np.int64)
    unchunked, chunked = dfp.AccumulatorStats(), dfp.AccumulatorStats()
    wrapped = dfp.chunked_matmul(x, w, 64, unchunked)
    right = dfp.chunked_matmul(x, w, dfp.chunk_length(w), chunked)
    assert unchunked.overflows == 3 and chunked.overflows == 0
    assert (right == 64 * dfp.MANTISSA_MAX**2).all() and (wrapped != right).all()


@pytest.mark.parametrize(
    ("groups", "stride", "pad", "dilation"), [(1, 1, 0, 1), (2, 2, 1, 1), (4, 1, 2, 2), (8, 2, 1, 1), (1, 3, 1, 2)]
)
def test_conv_kernel_is_exact(groups: int, stride: int, pad: int, dilation: int) -> None:
    rng = np.random.default_rng(groups * 10 + stride)
    x = rng.integers(-(2**15), 2**15, (2, 8, 9, 11))
    w = rng.integers(-(2**15), 2**15, (8, 8 // groups, 3, 3))
    bias = rng.integers(-(2**30), 2**30, 8)
    window = k.Window((3, 3), (stride, stride), (pad, pad, pad, pad), (dilation, dilation))
    stats = dfp.AccumulatorStats()
    weights, biases = k.Fixed.of(w, np.zeros((8, 1, 1, 1))), k.Fixed.of(bias, -3)
    got = k.conv(k.Fixed.of(x, -3), weights, biases, window, groups, 2, stats)
    expected = torch.nn.functional.conv2d(
        torch.from_numpy(x).double(), torch.from_numpy(w).double(), torch.from_numpy(bias).double(),
        stride=stride, padding=pad, dilation=dilation, groups=groups,
    ).numpy()  # fmt: skip
    assert np.array_equal(got.mantissas, expected.astype(np.int64))  # float64 is exact below 2**53
    assert stats.overflows == 0 and np.all(got.exponent == -3)


def test_requantize_rounds_averages_exactly() -> None:
    value = k.Fixed.of(np.array([5, 7, -5, 9]), -2, 2)  # 0.625, 0.875, -0.625, 1.125
    got, clipped = k.requantize(value, np.asarray(-2), np.int16)
    assert got.tolist() == [2, 4, -2, 4] and clipped == 0  # 2.5 -> 2, 3.5 -> 4, -2.5 -> -2, 4.5 -> 4
    _, clipped = k.requantize(k.Fixed.of(np.array([2**20]), 0), np.asarray(0), np.int16)
    assert clipped == 1


def test_clip_bounds_are_exact() -> None:
    x = k.Fixed.of(np.array([-40, 10, 100]), -3)  # -5, 1.25, 12.5
    clipped = k.clip(x, k.Fixed.from_float(np.float32(0.0)), k.Fixed.from_float(np.float32(6.0)))
    assert clipped.real().tolist() == [0.0, 1.25, 6.0]
