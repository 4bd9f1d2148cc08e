"""Calibration and evaluation data from ``.npz`` files, streamed in batches.

An ``.npz`` holds ``x`` (the model's single input, in its layout and dtype) or
one array per input name for multi-input models, plus optional ``y`` (int64
labels). Arrays are read row-block by row-block straight from the zip member,
so memory stays flat however many samples the file holds. Nothing is unpickled.
"""

from __future__ import annotations

import abc
import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compressor.errors import DataError
from compressor.runtime import InputSpec

LABEL_KEY = "y"
SINGLE_INPUT_KEY = "x"


@dataclass(frozen=True)
class ArrayInfo:
    """Header of one array inside the npz: where it is, its dtype and shape."""

    member: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize


@dataclass(frozen=True)
class Batch:
    """One batch: model feeds keyed by input name, and labels if the file has them."""

    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None


class Samples(abc.ABC):
    """Model inputs (and maybe labels) read lazily in batches: an ``.npz`` (`Dataset`) or images (`ImageFolder`)."""

    __slots__ = ()
    num_samples: int
    fixed_batch: int | None  # the model's batch dimension where it is a number: each batch holds that many samples

    @property
    @abc.abstractmethod
    def has_labels(self) -> bool:
        """Whether batches carry labels."""

    @abc.abstractmethod
    def batches(self, batch_size: int = 32, limit: int | None = None) -> Iterator[Batch]:
        """Yield batches in order, each checked."""

    @abc.abstractmethod
    def sample_elements(self) -> int:
        """Input values per sample, over all model inputs."""

    def batch_size_for(self, elements: int, cap: int) -> int:
        """The largest batch (at most ``cap``, at least 1) whose inputs hold no more than ``elements`` values.

        Activation memory grows with the input size, so passes that expose many
        intermediate tensors size their batches by it (a 224x224 image is 150k values).
        """
        if self.fixed_batch is not None:
            return self.fixed_batch
        return max(1, min(cap, elements // max(self.sample_elements(), 1)))

    def first_batch(self, count: int) -> dict[str, np.ndarray]:
        """Feeds of the first ``count`` samples (fewer if there are fewer; a model's fixed batch if it has one)."""
        count = self.fixed_batch or count
        return next(self.batches(batch_size=count, limit=count)).feeds

    def _plan(self, batch_size: int, limit: int | None) -> tuple[int, int]:
        """(batch size, samples to read) for `batches`: a model with a fixed batch dimension reads whole batches."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        total = self.num_samples if limit is None else min(limit, self.num_samples)
        if self.fixed_batch is None:
            return batch_size, total
        if self.num_samples < self.fixed_batch:
            raise DataError(f"the model's batch dimension is fixed at {self.fixed_batch}, and the data holds "
                            f"{self.num_samples} samples; provide at least {self.fixed_batch}")  # fmt: skip
        return self.fixed_batch, max(total - total % self.fixed_batch, self.fixed_batch)

    def validate(self) -> None:
        """Stream once through the data so bad values fail before any work starts (about 16 MB at a time)."""
        for _ in self.batches(batch_size=self.batch_size_for(2**22, 256)):
            pass


class Dataset(Samples):
    """A validated ``.npz`` bound to a model's inputs, read lazily in batches."""

    __slots__ = ("arrays", "fixed_batch", "labels", "num_samples", "path")

    def __init__(self, path: str | os.PathLike, specs: Sequence[InputSpec]) -> None:
        self.path = Path(path)
        self.fixed_batch = fixed_batch(specs)
        headers = _read_headers(self.path)
        self.arrays = {spec.name: _match_input(self.path, headers, spec, len(specs)) for spec in specs}
        sizes = {info.shape[0] for info in self.arrays.values()}
        if len(sizes) != 1:
            raise DataError(f"{self.path}: input arrays have different sample counts {sorted(sizes)}; make them equal")
        self.num_samples = sizes.pop()
        if self.num_samples == 0:
            raise DataError(f"{self.path}: holds zero samples; provide at least one")
        self.labels = headers.get(LABEL_KEY)
        if self.labels is not None:
            _check_labels(self.path, self.labels, self.num_samples)

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def batches(self, batch_size: int = 32, limit: int | None = None) -> Iterator[Batch]:
        """Yield batches in file order, checking every value is finite."""
        batch_size, total = self._plan(batch_size, limit)
        with zipfile.ZipFile(self.path) as archive:
            readers = {name: _RowReader(archive, info) for name, info in self.arrays.items()}
            label_reader = _RowReader(archive, self.labels) if self.labels is not None else None
            for start in range(0, total, batch_size):
                count = min(batch_size, total - start)
                feeds = {name: reader.read(count) for name, reader in readers.items()}
                for name, array in feeds.items():
                    _check_finite(self.path, name, array, start)
                labels = label_reader.read(count).astype(np.int64) if label_reader is not None else None
                yield Batch(feeds, labels)

    def sample_elements(self) -> int:
        return sum(int(np.prod(info.shape[1:])) for info in self.arrays.values())


def fixed_batch(specs: Sequence[InputSpec]) -> int | None:
    """The leading dimension the model's inputs fix (exported without a dynamic batch), or None."""
    fixed = {spec.shape[0] for spec in specs if spec.shape and isinstance(spec.shape[0], int)}
    return fixed.pop() if len(fixed) == 1 else None


class _RowReader:
    """Reads consecutive leading-axis rows of one .npy member of an open zip."""

    __slots__ = ("_info", "_stream")

    def __init__(self, archive: zipfile.ZipFile, info: ArrayInfo) -> None:
        self._info = info
        self._stream = archive.open(info.member)
        _read_npy_header(self._stream)

    def read(self, rows: int) -> np.ndarray:
        data = self._stream.read(rows * self._info.row_bytes)
        if len(data) != rows * self._info.row_bytes:
            raise DataError(f"array '{self._info.member}' is truncated; re-create the npz")
        return np.frombuffer(data, dtype=self._info.dtype).reshape((rows, *self._info.shape[1:])).copy()


def _read_npy_header(stream) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    return np.lib.format.read_array_header_2_0(stream)


def _read_headers(path: Path) -> dict[str, ArrayInfo]:
    if not path.exists():
        raise DataError(f"data file not found: {path}; check the path")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path} is not an .npz file; save arrays with numpy.savez(path, x=..., y=...)")
    headers = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if not member.endswith(".npy"):
                    continue
                with archive.open(member) as stream:
                    shape, fortran_order, dtype = _read_npy_header(stream)
                if dtype.hasobject:
                    raise DataError(f"{path}: array '{member[:-4]}' holds Python objects; store numeric arrays only")
                if fortran_order and len(shape) > 1:
                    raise DataError(f"{path}: array '{member[:-4]}' is Fortran-ordered; save np.ascontiguousarray(a)")
                headers[member[:-4]] = ArrayInfo(member, dtype, tuple(shape))
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise DataError(f"{path} is a damaged .npz ({exc}); re-create it") from None
    if not headers:
        raise DataError(f"{path} holds no arrays; save arrays with numpy.savez(path, x=..., y=...)")
    return headers


def _match_input(path: Path, headers: dict[str, ArrayInfo], spec: InputSpec, num_inputs: int) -> ArrayInfo:
    info = headers.get(spec.name)
    if info is None and num_inputs == 1:
        info = headers.get(SINGLE_INPUT_KEY)
    if info is None:
        expected = f"'{SINGLE_INPUT_KEY}' or '{spec.name}'" if num_inputs == 1 else f"'{spec.name}'"
        raise DataError(f"{path}: no array for model input '{spec.name}'; add one named {expected}")
    key = info.member[:-4]
    if info.dtype != spec.dtype:
        raise DataError(
            f"{path}: array '{key}' is {info.dtype} but input '{spec.name}' takes {spec.dtype}; "
            f"convert it with .astype(np.{spec.dtype})"
        )
    if len(info.shape) != len(spec.shape):
        raise DataError(
            f"{path}: array '{key}' has shape {info.shape} but input '{spec.name}' is {_describe(spec.shape)}; "
            "store samples stacked along the first axis in the model's layout"
        )
    for axis, (have, want) in enumerate(zip(info.shape[1:], spec.shape[1:], strict=True), start=1):
        if isinstance(want, int) and have != want:
            raise DataError(
                f"{path}: array '{key}' has shape {info.shape} but input '{spec.name}' is {_describe(spec.shape)} "
                f"(axis {axis}: {have} != {want}); resize or transpose the data to the model's layout"
            )
    return info


def _check_labels(path: Path, labels: ArrayInfo, num_samples: int) -> None:
    if labels.shape != (num_samples,):
        raise DataError(
            f"{path}: labels 'y' have shape {labels.shape}, expected ({num_samples},); one label per sample"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: labels 'y' are {labels.dtype}; store class indices as int64")


def _check_finite(path: Path, name: str, array: np.ndarray, offset: int) -> None:
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        bad = offset + int(np.argwhere(~np.isfinite(array))[0][0])
        raise DataError(f"{path}: input '{name}' has NaN or Inf at sample {bad}; clean or drop that sample")


def _describe(shape: tuple[int | str | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
