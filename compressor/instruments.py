"""Pass instruments, after TVM's: hooks that run around every pass.

- `Timing` fills each record's wall time.
- `VerifyNumerics` runs onnxruntime before and after each pass and enforces the
  pass's `Tolerance`.
- `DumpIR` writes ``NNN_passname.onnx`` after every pass.
- `ProgressBar` shows which pass is running; `stage` names a long step inside
  or after a pass (calibration has its own bar).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from compressor import ir as cir
from compressor import runtime
from compressor.metrics import compare_outputs
from compressor.pipeline import Pass, PassContext, PassRecord


class NumericsError(AssertionError):
    """A pass moved the outputs beyond its declared tolerance (a bug in that pass)."""


class Instrument:
    """Base instrument; every hook is optional."""

    def enter_pipeline(self, model: ir.Model, passes: Sequence[Pass]) -> None:
        """Called once before the first pass."""

    def run_before_pass(self, model: ir.Model, pass_: Pass, record: PassRecord) -> None:
        """Called before each pass."""

    def run_after_pass(self, model: ir.Model, pass_: Pass, record: PassRecord) -> None:
        """Called after each pass that returned normally."""

    def exit_pipeline(self, model: ir.Model) -> None:
        """Called once after the last pass, also when a pass failed."""


class Timing(Instrument):
    """Wall time of each pass, written to its record."""

    __slots__ = ("_start",)

    def __init__(self) -> None:
        self._start = 0.0

    def run_before_pass(self, model: ir.Model, pass_: Pass, record: PassRecord) -> None:
        self._start = time.perf_counter()

    def run_after_pass(self, model: ir.Model, pass_: Pass, record: PassRecord) -> None:
        record.seconds = time.perf_counter() - self._start


class VerifyNumerics(Instrument):
    """Check every modifying pass against onnxruntime at the pass's tolerance.

    Feeds come from ``feeds`` if given, else the first calibration batch of the
    active `PassContext`, else seeded random inputs. The reference is the
    output before the pass, so each pass is judged on its own error.
    """

    __slots__ = ("_feeds", "_reference", "batch")

    def __init__(self, feeds: Mapping[str, np.ndarray] | None = None, batch: int = 8) -> None:
        self._feeds = dict(feeds) if feeds is not None else None
        self._reference: list[np.ndarray] = []
        self.batch = batch

    def enter_pipeline(self, model: ir.Model, passes: Sequence[Pass]) -> None:
        if self._feeds is None:
            context = PassContext.current()
            if context.calibration is not None:
                self._feeds = context.calibration.first_batch(self.batch)
            else:
                self._feeds = runtime.random_feeds(
                    runtime.input_specs(model, context.input_shapes), self.batch, context.seed
                )
        self._reference = self._evaluate(model)

    def run_after_pass(self, model: ir.Model, pass_: Pass, record: PassRecord) -> None:
        if not record.modified:
            return
        outputs = self._evaluate(model)
        comparison = compare_outputs(self._reference, outputs)
        record.metrics.update(comparison.as_dict())
        problem = comparison.violation(pass_.tolerance)
        if problem:
            raise NumericsError(f"outputs moved beyond the pass's tolerance: {problem}")
        self._reference = outputs

    def _evaluate(self, model: ir.Model) -> list[np.ndarray]:
        options = runtime.session_options(optimize=False)
        return runtime.run(runtime.make_session(model, options=options), self._feeds or {})


class DumpIR(Instrument):
    """Write the model before the first pass and after every pass to a folder."""

    __slots__ = ("folder",)

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def enter_pipeline(self, model: ir.Model, passes: Sequence[Pass]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        cir.save_model(model, self.folder / "000_input.onnx", force=True)

    def run_after_pass(self, model: ir.Model, pass_: Pass, record: PassRecord) -> None:
        cir.save_model(model, self.folder / f"{record.index + 1:03d}_{pass_.name}.onnx", force=True)


class ProgressBar(Instrument):
    """A tqdm bar over the passes, on stderr, hidden when stderr is not a terminal."""

    __slots__ = ("_bar", "enabled")

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar: tqdm | None = None

    def enter_pipeline(self, model: ir.Model, passes: Sequence[Pass]) -> None:
        self._bar = tqdm(total=len(passes), unit="pass", disable=not self.enabled, leave=False)

    def run_before_pass(self, model: ir.Model, pass_: Pass, record: PassRecord) -> None:
        if self._bar is not None:
            self._bar.set_description(pass_.name)

    def run_after_pass(self, model: ir.Model, pass_: Pass, record: PassRecord) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def exit_pipeline(self, model: ir.Model) -> None:
        if self._bar is not None:
            self._bar.close()


@contextmanager
def stage(name: str, detail: str = "", context: PassContext | None = None, *, announce: bool = True) -> Iterator[None]:
    """Time a long step into ``context.steps[name]`` (seconds, summed over repeats) and, when
    ``context.progress`` is on, name it on stderr while it runs (``announce`` False: it shows its own bar).
    ``context`` defaults to the active one, inside a pass."""
    context = context or PassContext.current()
    shown = context.progress and announce
    line = tqdm(total=0, desc=name + detail, bar_format="{desc}...", disable=not shown, leave=False)
    start = time.perf_counter()
    try:
        yield
    finally:
        context.steps[name] = context.steps.get(name, 0.0) + time.perf_counter() - start
        line.close()
