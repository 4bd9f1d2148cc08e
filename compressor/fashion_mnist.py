"""Read Fashion-MNIST from the IDX files that `dataset-fashion-mnist` installs.

The IDX format (http://yann.lecun.com/exdb/mnist/) is a 4-byte magic number
``00 00 <dtype code> <ndim>``, then ``ndim`` big-endian uint32 dimensions, then the
payload in row-major order, big-endian. Files may be gzipped.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Literal

import numpy as np

from compressor.errors import DataError

__all__ = ["CLASS_NAMES", "DEFAULT_ROOT", "load_fashion_mnist", "read_idx"]

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# IDX dtype code -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}

_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _read_bytes(path: Path) -> bytes:
    """Return the file's contents, decompressed if it is gzipped."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            return gzip.decompress(raw)
        return raw
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read IDX file: {exc}") from exc


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into an array in native byte order.

    The dtype and shape come from the file's header.

    Raises:
        DataError: the file is missing, is not IDX, or its payload does not match
            the size its header declares.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX dtype code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes, need {header})")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header
    if actual != expected:
        raise DataError(f"{path}: IDX payload is {actual} bytes but header {shape} needs {expected}")
    array = np.frombuffer(data, dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def load_fashion_mnist(split: Literal["train", "test"], root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load a Fashion-MNIST split.

    Args:
        split: ``"train"`` (60 000 images) or ``"test"`` (10 000 images).
        root: folder with the four ``*-ubyte.gz`` files; defaults to `DEFAULT_ROOT`.

    Returns:
        ``(images, labels)``: uint8 ``[N, 28, 28]`` and int64 ``[N]`` in ``0..9``.

    Raises:
        DataError: the files are missing or malformed.
    """
    if split not in _FILES:
        raise DataError(f"unknown Fashion-MNIST split {split!r}: use 'train' or 'test'")
    root = Path(root) if root is not None else DEFAULT_ROOT
    image_path, label_path = (root / name for name in _FILES[split])
    if not (image_path.is_file() and label_path.is_file()):
        raise DataError(
            f"Fashion-MNIST not found in {root}: install it with `apt-get install -y dataset-fashion-mnist`"
        )
    images = read_idx(image_path)
    labels = read_idx(label_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{image_path}: expected uint8 [N,28,28], got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"{label_path}: expected {images.shape[0]} labels, got shape {labels.shape}")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise DataError(f"{label_path}: labels outside 0..{len(CLASS_NAMES) - 1}")
    return images, labels
