"""Passes, their context and the pipeline that runs them under instruments.

A `Pass` is an in-place onnx-ir pass that also declares what data it needs and
how far it may move the model's outputs. A `Pipeline` checks every pass's needs
against the `PassContext` before running anything, then runs the passes with
the context active (TVM style: `PassContext.current()`), calling each
instrument's `run_before_pass` / `run_after_pass` around every pass.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult, PreconditionError

from compressor.errors import CompressorError, MissingContextError, PassFailedError

if TYPE_CHECKING:
    from compressor.data import Samples
    from compressor.instruments import Instrument

# What each declared need means, and the CLI flag that provides it.
NEED_PROVIDERS: dict[str, str] = {
    "calibration": "--calib DATA.npz",
    "labels": "--eval DATA.npz with a 'y' array of labels",
    "train_data": "--train DATA.npz",
}


@dataclass(frozen=True)
class Tolerance:
    """How far a pass may move the model's outputs.

    Lossless rewrites bound the error relative to the output's scale:
    ``max|new - old| <= max_relative_error * max|old|``. Lossy passes set a floor
    on the signal-to-quantization-noise ratio and/or top-1 agreement instead.
    """

    max_relative_error: float | None = 1e-5
    min_sqnr_db: float | None = None
    min_top1_agreement: float | None = None

    @property
    def lossless(self) -> bool:
        return self.min_sqnr_db is None and self.min_top1_agreement is None


LOSSLESS = Tolerance()


@dataclass
class PassContext:
    """Everything a pass may ask for besides the model: data, seed, backend name.

    Use as a context manager to make it `PassContext.current()`.
    """

    calibration: Samples | None = None
    evaluation: Samples | None = None
    train: Samples | None = None
    backend: str = "cpu"
    seed: int = 0
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # --input-shape: sizes left symbolic
    progress: bool = False  # long steps show progress on stderr (`compressor.instruments.stage`)
    steps: dict[str, float] = field(default_factory=dict)  # seconds spent in each named long step
    options: dict[str, Any] = field(default_factory=dict)

    _current: ClassVar[contextvars.ContextVar[PassContext | None]] = contextvars.ContextVar(
        "compressor_pass_context", default=None
    )

    def provides(self, need: str) -> bool:
        """Whether this context satisfies a pass's declared need."""
        if need == "calibration":
            return self.calibration is not None
        if need == "labels":
            return self.evaluation is not None and self.evaluation.has_labels
        if need == "train_data":
            return self.train is not None and self.train.has_labels
        raise ValueError(f"unknown need {need!r}; known: {sorted(NEED_PROVIDERS)}")

    def rng(self, salt: int = 0) -> np.random.Generator:
        """A generator seeded from the context seed, so passes are reproducible."""
        return np.random.default_rng([self.seed, salt])

    @classmethod
    def current(cls) -> PassContext:
        """The active context, or an empty default one outside a pipeline."""
        return cls._current.get() or PassContext()

    @contextmanager
    def activate(self) -> Iterator[PassContext]:
        token = self._current.set(self)
        try:
            yield self
        finally:
            self._current.reset(token)


class Pass(InPlacePass):
    """Base of our passes: an onnx-ir in-place pass with declared needs and tolerance.

    Subclasses set ``name``, optionally ``needs`` and ``tolerance``, and take their
    settings from a frozen config dataclass passed to ``__init__``.
    """

    name: ClassVar[str] = "pass"
    needs: ClassVar[frozenset[str]] = frozenset()
    tolerance: ClassVar[Tolerance] = LOSSLESS
    config_class: ClassVar[type | None] = None  # the frozen dataclass that configures the pass

    def __init__(self, config: Any = None) -> None:
        super().__init__()
        if config is None and self.config_class is not None:
            config = self.config_class()
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PassRecord:
    """What happened in one pass; instruments add timing and numerics."""

    __slots__ = ("index", "metrics", "modified", "name", "seconds")

    def __init__(self, name: str, index: int) -> None:
        self.name = name
        self.index = index
        self.modified = False
        self.seconds = 0.0
        self.metrics: dict[str, float] = {}

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "modified": self.modified,
            "seconds": round(self.seconds, 4),
            "metrics": self.metrics,
        }


class Pipeline:
    """An ordered list of passes run in place on one model.

    >>> pipeline = Pipeline([FoldBatchNorm(), Cleanup()])
    >>> records = pipeline.run(model, PassContext(), instruments=[Timing()])
    """

    __slots__ = ("passes",)

    def __init__(self, passes: Sequence[Pass]) -> None:
        self.passes = list(passes)

    def check_needs(self, context: PassContext) -> None:
        """Fail before any work if a pass needs data the context lacks."""
        for pass_ in self.passes:
            for need in sorted(pass_.needs):
                if not context.provides(need):
                    raise MissingContextError(
                        f"pass '{pass_.name}' needs {need.replace('_', ' ')} data: pass {NEED_PROVIDERS[need]}"
                    )

    def run(
        self,
        model: ir.Model,
        context: PassContext | None = None,
        instruments: Sequence[Instrument] = (),
    ) -> list[PassRecord]:
        """Run every pass on ``model`` in place and return one record per pass."""
        context = context or PassContext()
        self.check_needs(context)
        records: list[PassRecord] = []
        with context.activate():
            for instrument in instruments:
                instrument.enter_pipeline(model, self.passes)
            try:
                for index, pass_ in enumerate(self.passes):
                    records.append(self._run_one(model, pass_, index, instruments, records))
            finally:
                for instrument in instruments:
                    instrument.exit_pipeline(model)
        return records

    def _run_one(
        self,
        model: ir.Model,
        pass_: Pass,
        index: int,
        instruments: Sequence[Instrument],
        done: list[PassRecord],
    ) -> PassRecord:
        record = PassRecord(pass_.name, index)
        try:
            for instrument in instruments:
                instrument.run_before_pass(model, pass_, record)
            result: PassResult = pass_(model)
            record.modified = result.modified
            for instrument in instruments:
                instrument.run_after_pass(model, pass_, record)
        except CompressorError as exc:
            raise type(exc)(f"pass '{pass_.name}': {exc}") from exc
        except PreconditionError as exc:
            # onnx-ir wraps whatever `requires` raised; a user error stays a user error.
            if isinstance(exc.__cause__, CompressorError):
                raise type(exc.__cause__)(f"pass '{pass_.name}': {exc.__cause__}") from exc
            raise PassFailedError(f"pass '{pass_.name}' cannot run on this model: {exc}") from exc
        except Exception as exc:
            before = ", ".join(r.name for r in done) or "none"
            raise PassFailedError(
                f"pass '{pass_.name}' failed (passes run before it: {before}): {type(exc).__name__}: {exc}"
            ) from exc
        return record
