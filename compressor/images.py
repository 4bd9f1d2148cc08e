"""Calibration and evaluation data from a folder of images, decoded and preprocessed batch by batch.

``--calib photos/ --preprocess resize=256,crop=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225``
reads every ``.jpg``/``.jpeg``/``.png``/``.bmp``/``.webp`` below ``photos/`` in
sorted order. Each image is converted to the model's channel count (RGB or
grey), its short side resized to ``resize``, centre-cropped to ``crop`` (or to
the model's own height and width), scaled by ``scale``, normalised with
``mean``/``std`` per channel and laid out ``nchw`` or ``nhwc``. When every image
sits in a first-level sub-folder, the sub-folders in sorted order are classes
0, 1, 2... (ImageNet's synset folders sort in its class order). Only one batch of pixels is in memory at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from compressor.data import Batch, Samples, fixed_batch
from compressor.errors import DataError, UsageError
from compressor.runtime import InputSpec

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})


@dataclass(frozen=True)
class Preprocess:
    """How an image file becomes one model input sample."""

    resize: int | None = None  # short side, before the crop; None: straight to the crop size
    crop: int | None = None  # square centre crop; None: the model's height and width
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "nchw"

    @classmethod
    def parse(cls, text: str | None) -> Preprocess:
        """``key=value`` pairs separated by commas; per-channel lists use ``/`` (``mean=0.485/0.456/0.406``)."""
        if not text:
            return cls()
        known = {f.name for f in fields(cls)}
        values: dict[str, object] = {}
        for item in text.split(","):
            key, _, value = item.partition("=")
            key = key.strip()
            if key not in known or not value:
                keys = ", ".join(sorted(known))
                raise UsageError(f"--preprocess: cannot read {item!r}; use key=value with keys {keys}")
            try:
                if key in ("resize", "crop"):
                    values[key] = int(value)
                elif key == "scale":
                    values[key] = float(value)
                elif key in ("mean", "std"):
                    values[key] = tuple(float(v) for v in value.split("/"))
                else:
                    values[key] = value.strip().lower()
            except ValueError:
                raise UsageError(f"--preprocess: {key}={value!r} is not a number") from None
        result = cls(**values)  # type: ignore[arg-type]
        if result.layout not in ("nchw", "nhwc"):
            raise UsageError(f"--preprocess: layout={result.layout!r} must be nchw or nhwc")
        if any(s == 0 for s in result.std) or any(v is not None and v < 1 for v in (result.resize, result.crop)):
            raise UsageError("--preprocess: std must be non-zero and resize/crop positive")
        return result


class ImageFolder(Samples):
    """The images below a folder, bound to a single-input image model."""

    __slots__ = ("channels", "files", "fixed_batch", "labels", "num_samples", "path", "preprocess", "size", "spec")

    def __init__(self, path: str | os.PathLike, specs: Sequence[InputSpec], preprocess: Preprocess) -> None:
        self.path, self.preprocess = Path(path), preprocess
        if len(specs) != 1:
            raise DataError(f"{self.path}: image folders feed single-input models; this one has {len(specs)} inputs")
        self.spec = specs[0]
        self.fixed_batch = fixed_batch(specs)
        if len(self.spec.shape) != 4:
            raise DataError(f"{self.path}: the model input {self.spec.name} is not 4-D (N, C, H, W or N, H, W, C)")
        channel_axis, spatial = (1, (2, 3)) if preprocess.layout == "nchw" else (3, (1, 2))
        channels = self.spec.shape[channel_axis]
        if channels not in (1, 3):
            raise UsageError(f"model input {self.spec.name} has {channels} channels in {preprocess.layout} layout; "
                             "images need 1 or 3: set --preprocess layout=")  # fmt: skip
        self.channels = int(channels)
        height, width = (self.spec.shape[axis] for axis in spatial)
        if preprocess.crop is not None:
            if {height, width} - {preprocess.crop} and all(isinstance(d, int) for d in (height, width)):
                raise UsageError(f"--preprocess crop={preprocess.crop} but the model takes {height}x{width} images")
            height = width = preprocess.crop
        if not isinstance(height, int) or not isinstance(width, int):
            raise UsageError(f"model input {self.spec.name} has no fixed height/width: set --preprocess crop=")
        self.size = (height, width)
        for name, values in (("mean", preprocess.mean), ("std", preprocess.std)):
            if len(values) not in (1, self.channels):
                raise UsageError(f"--preprocess {name} has {len(values)} values for {self.channels} channels")
        self.files = sorted(p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        self.num_samples = len(self.files)
        if not self.files:
            raise DataError(f"{self.path}: holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); add some")
        classes = sorted({p.parent.name for p in self.files})
        by_class = all(p.parent.parent == self.path for p in self.files)
        self.labels = np.array([classes.index(p.parent.name) for p in self.files]) if by_class else None

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def sample_elements(self) -> int:
        return self.channels * self.size[0] * self.size[1]

    def batches(self, batch_size: int = 32, limit: int | None = None) -> Iterator[Batch]:
        """Decode and preprocess ``batch_size`` images at a time, in sorted path order."""
        batch_size, total = self._plan(batch_size, limit)
        for start in range(0, total, batch_size):
            chunk = self.files[start : start + batch_size][: total - start]
            pixels = np.stack([self._load(path) for path in chunk])
            labels = self.labels[start : start + len(chunk)] if self.labels is not None else None
            yield Batch({self.spec.name: pixels.astype(self.spec.dtype, copy=False)}, labels)

    def _load(self, path: Path) -> np.ndarray:
        try:
            with Image.open(path) as image:
                image = image.convert("RGB" if self.channels == 3 else "L")
                image = self._resize_and_crop(image)
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{path}: cannot be read as an image ({exc}); remove or replace it") from None
        array = np.asarray(image, dtype=np.float32).reshape(self.size[0], self.size[1], self.channels)
        p = self.preprocess
        array = (array * p.scale - np.asarray(p.mean, np.float32)) / np.asarray(p.std, np.float32)
        return array.transpose(2, 0, 1) if p.layout == "nchw" else array

    def _resize_and_crop(self, image: Image.Image) -> Image.Image:
        height, width = self.size
        short = self.preprocess.resize
        if short is None:
            return image.resize((width, height), Image.Resampling.BILINEAR)
        factor = short / min(image.size)
        resized = image.resize((max(width, round(image.width * factor)), max(height, round(image.height * factor))),
                               Image.Resampling.BILINEAR)  # fmt: skip
        left, top = (resized.width - width) // 2, (resized.height - height) // 2
        return resized.crop((left, top, left + width, top + height))
