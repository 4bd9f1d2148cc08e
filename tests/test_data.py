"""The npz reader: batches match the arrays, memory stays flat, bad files are user errors."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from compressor.data import Dataset
from compressor.errors import DataError
from compressor.runtime import InputSpec

SPEC = [InputSpec("input", np.dtype(np.float32), ("N", 3, 16, 16))]


def write(path: Path, compressed: bool = False, **arrays: np.ndarray) -> Path:
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)


@pytest.mark.parametrize("compressed", [False, True])
def test_batches_reproduce_the_arrays(tmp_path: Path, compressed: bool) -> None:
    x, y = images(70), np.arange(70, dtype=np.int64) % 10
    data = Dataset(write(tmp_path / "d.npz", compressed, x=x, y=y), SPEC)
    assert data.num_samples == 70 and data.has_labels
    batches = list(data.batches(batch_size=32))
    assert [b.feeds["input"].shape[0] for b in batches] == [32, 32, 6]
    np.testing.assert_array_equal(np.concatenate([b.feeds["input"] for b in batches]), x)
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), y)
    assert [b.feeds["input"].shape[0] for b in data.batches(batch_size=32, limit=40)] == [32, 8]
    np.testing.assert_array_equal(data.first_batch(5)["input"], x[:5])


@pytest.mark.parametrize(("batch", "expected"), [(1, [1] * 10), (4, [4, 4])])
def test_a_fixed_batch_dimension_sets_every_batch(tmp_path: Path, batch: int, expected: list[int]) -> None:
    """A model exported without a dynamic batch takes exactly that many samples per run."""
    x = images(10)
    data = Dataset(write(tmp_path / "d.npz", x=x), [InputSpec("input", np.dtype(np.float32), (batch, 3, 16, 16))])
    assert data.batch_size_for(2**22, 32) == batch
    sizes = [b.feeds["input"].shape[0] for b in data.batches(batch_size=8)]
    assert sizes == expected  # the 2 samples left over a whole batch of 4 are not run
    np.testing.assert_array_equal(data.first_batch(1)["input"], x[:batch])
    with pytest.raises(DataError, match=r"fixed at 16.*provide at least 16"):
        Dataset(tmp_path / "d.npz", [InputSpec("input", np.dtype(np.float32), (16, 3, 16, 16))]).validate()


def test_multi_input_models_use_one_key_per_input(tmp_path: Path) -> None:
    specs = [InputSpec("a", np.dtype(np.float32), ("N", 2)), InputSpec("b", np.dtype(np.int64), ("N",))]
    a, b = np.ones((5, 2), np.float32), np.arange(5, dtype=np.int64)
    data = Dataset(write(tmp_path / "m.npz", a=a, b=b), specs)
    batch = next(data.batches(batch_size=8))
    np.testing.assert_array_equal(batch.feeds["b"], b)
    with pytest.raises(DataError, match="no array for model input 'b'"):
        Dataset(write(tmp_path / "m2.npz", a=a), specs)


def peak_bytes_while_streaming(path: Path) -> int:
    data = Dataset(path, SPEC)
    tracemalloc.start()
    try:
        for _ in data.batches(batch_size=32):
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_samples(tmp_path: Path) -> None:
    small = peak_bytes_while_streaming(write(tmp_path / "s.npz", True, x=images(64)))
    large = peak_bytes_while_streaming(write(tmp_path / "l.npz", True, x=images(2048)))
    one_batch = 32 * 3 * 16 * 16 * 4
    assert large < small + one_batch  # the 2048-sample array is 6 MB; we hold about one batch
    assert large < 8 * one_batch


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": images(4).astype(np.float64)}, "float64 but input 'input' takes float32"),
        ({"x": images(4)[:, :, :8]}, "axis 2: 8 != 16"),
        ({"x": images(4)[0]}, "store samples stacked"),
        ({"x": images(0)}, "zero samples"),
        ({"z": images(4)}, "no array for model input 'input'"),
        ({"x": images(4), "y": np.zeros(3, np.int64)}, "one label per sample"),
        ({"x": images(4), "y": np.zeros(4, np.float32)}, "int64"),
    ],
)
def test_header_problems_are_caught_on_open(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(DataError, match=message):
        Dataset(write(tmp_path / "bad.npz", **arrays), SPEC)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_name_the_sample(tmp_path: Path, bad: float) -> None:
    x = images(50)
    x[41, 1, 2, 3] = bad
    data = Dataset(write(tmp_path / "nan.npz", x=x), SPEC)
    with pytest.raises(DataError, match="NaN or Inf at sample 41"):
        data.validate()


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        Dataset(tmp_path / "missing.npz", SPEC)
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(DataError, match=r"not an \.npz"):
        Dataset(tmp_path / "text.npz", SPEC)
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="Python objects"):
        Dataset(tmp_path / "obj.npz", SPEC)
