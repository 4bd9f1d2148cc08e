"""Tests for the Fashion-MNIST IDX reader and the shipped demo model."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from compressor.errors import DataError
from compressor.fashion_mnist import CLASS_NAMES, DEFAULT_ROOT, load_fashion_mnist, read_idx

DEMO_DIR = Path(__file__).resolve().parent.parent / "compressor" / "demo"
HAVE_DATASET = (DEFAULT_ROOT / "t10k-labels-idx1-ubyte.gz").is_file()
needs_dataset = pytest.mark.skipif(
    not HAVE_DATASET,
    reason=f"Fashion-MNIST not installed in {DEFAULT_ROOT} (apt-get install -y dataset-fashion-mnist)",
)


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    """Encode ``array`` as an IDX file with dtype code ``code``."""
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def test_round_trip_small_files(tmp_path: Path) -> None:
    """read_idx decodes uint8 and big-endian float32 files, gzipped or not."""
    u8 = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    f32 = np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2)
    (tmp_path / "u8.idx").write_bytes(_idx_bytes(u8, 0x08))
    (tmp_path / "f32.idx.gz").write_bytes(gzip.compress(_idx_bytes(f32, 0x0D)))
    np.testing.assert_array_equal(read_idx(tmp_path / "u8.idx"), u8)
    got = read_idx(tmp_path / "f32.idx.gz")
    assert got.dtype == np.float32 and got.dtype.isnative
    np.testing.assert_array_equal(got, f32)


@needs_dataset
def test_read_real_test_split() -> None:
    """The real test split has 10k 28x28 uint8 images and int64 labels in 0..9."""
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert labels.min() == 0 and labels.max() == len(CLASS_NAMES) - 1 == 9
    assert np.bincount(labels).tolist() == [1000] * 10


def test_truncated_gzip_raises(tmp_path: Path) -> None:
    """A gzip stream cut short raises DataError naming the file."""
    data = gzip.compress(_idx_bytes(np.zeros((10, 28, 28), np.uint8), 0x08))
    path = tmp_path / "cut-images-idx3-ubyte.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut-images"):
        read_idx(path)


def test_truncated_payload_raises(tmp_path: Path) -> None:
    """A valid gzip whose IDX payload is shorter than the header says raises DataError."""
    data = _idx_bytes(np.zeros((10, 28, 28), np.uint8), 0x08)
    path = tmp_path / "short-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(data[:-100]))
    with pytest.raises(DataError, match="payload"):
        read_idx(path)


@pytest.mark.parametrize("content", [b"", b"\x00\x00", b"\x12\x34\x08\x01", b"\x00\x00\x42\x01"])
def test_bad_header_raises(tmp_path: Path, content: bytes) -> None:
    """Empty files, bad magic numbers and unknown dtype codes raise DataError."""
    path = tmp_path / "bad.idx"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"bad\.idx"):
        read_idx(path)


def test_missing_root_raises(tmp_path: Path) -> None:
    """A folder without the dataset raises DataError that says how to install it."""
    with pytest.raises(DataError, match="apt-get install") as info:
        load_fashion_mnist("train", root=tmp_path / "nowhere")
    assert "\n" not in str(info.value)


@needs_dataset
def test_demo_model_accuracy() -> None:
    """The shipped demo.onnx reaches >= 90% top-1 on the first 2000 test images."""
    ort = pytest.importorskip("onnxruntime")
    images, labels = load_fashion_mnist("test")
    x = (images[:2000].astype(np.float32) / 255.0)[:, None]
    session = ort.InferenceSession(str(DEMO_DIR / "demo.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"input": x})[0]
    assert logits.shape == (2000, 10)
    accuracy = float((logits.argmax(1) == labels[:2000]).mean())
    assert accuracy >= 0.90, accuracy


def test_demo_npz_matches_dataset() -> None:
    """demo.npz holds 512 float32 images in [0, 1] and int64 labels."""
    with np.load(DEMO_DIR / "demo.npz") as data:
        x, y = data["x"], data["y"]
    assert x.shape == (512, 1, 28, 28) and x.dtype == np.float32
    assert y.shape == (512,) and y.dtype == np.int64
    assert x.min() >= 0.0 and x.max() <= 1.0
    if HAVE_DATASET:
        images, labels = load_fashion_mnist("test")
        np.testing.assert_array_equal(y, labels[:512])
        np.testing.assert_array_equal(x, (images[:512].astype(np.float32) / 255.0)[:, None])
