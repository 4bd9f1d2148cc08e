"""Pipeline: needs are checked first, errors name the pass, instruments observe every pass."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx_ir as ir
import pytest
from conftest import assert_close, conv_bn_model, random_input, run_onnx
from onnx_ir.passes import PassResult

from compressor.api import compress
from compressor.data import Dataset
from compressor.errors import DataError, MissingContextError, PassFailedError
from compressor.instruments import DumpIR, Instrument, Timing, VerifyNumerics
from compressor.passes import Cleanup, FoldBatchNorm
from compressor.pipeline import Pass, PassContext, PassRecord, Pipeline, Tolerance
from compressor.runtime import input_specs


class ScaleWeights(Pass):
    """Deliberately lossy: scales the first Conv weight, moving outputs."""

    name = "scale_weights"

    def __init__(self, factor: float, tolerance: Tolerance | None = None) -> None:
        super().__init__()
        self.factor = factor
        if tolerance is not None:
            self.tolerance = tolerance

    def call(self, model: ir.Model) -> PassResult:
        value = model.graph.initializers["w1"]
        value.const_value = ir.tensor(value.const_value.numpy() * np.float32(self.factor), name="w1")
        return PassResult(model, True)


class NeedsCalibration(Pass):
    name = "needs_calibration"
    needs: ClassVar[frozenset[str]] = frozenset({"calibration"})

    def __init__(self) -> None:
        super().__init__()
        self.seen: PassContext | None = None

    def call(self, model: ir.Model) -> PassResult:
        self.seen = PassContext.current()
        return PassResult(model, False)


class Explodes(Pass):
    name = "explodes"

    def call(self, model: ir.Model) -> PassResult:
        raise ValueError("boom")


class Recorder(Instrument):
    def __init__(self) -> None:
        self.events: list[str] = []

    def enter_pipeline(self, model, passes) -> None:
        self.events.append(f"enter:{len(passes)}")

    def run_before_pass(self, model, pass_, record: PassRecord) -> None:
        self.events.append(f"before:{pass_.name}")

    def run_after_pass(self, model, pass_, record: PassRecord) -> None:
        self.events.append(f"after:{pass_.name}:{record.modified}")

    def exit_pipeline(self, model) -> None:
        self.events.append("exit")


def model() -> ir.Model:
    return ir.serde.deserialize_model(conv_bn_model(identity=True))


def npz(tmp_path: Path, samples: int = 16) -> Path:
    path = tmp_path / "calib.npz"
    np.savez(path, x=random_input((samples, 3, 8, 8)))
    return path


def test_missing_data_fails_before_any_pass_runs() -> None:
    recorder = Recorder()
    pipeline = Pipeline([Cleanup(), NeedsCalibration()])
    with pytest.raises(MissingContextError, match=r"needs_calibration.*--calib"):
        pipeline.run(model(), PassContext(), [recorder])
    assert recorder.events == []


def test_context_is_current_inside_passes(tmp_path: Path) -> None:
    m = model()
    context = PassContext(calibration=Dataset(npz(tmp_path), input_specs(m)), seed=7)
    needy = NeedsCalibration()
    Pipeline([needy]).run(m, context)
    assert needy.seen is context
    assert PassContext.current() is not context  # reset after the run


def test_instruments_see_every_pass_in_order() -> None:
    recorder = Recorder()
    # the second cleanup drops the initializers the fold left unused
    Pipeline([Cleanup(), FoldBatchNorm(), Cleanup(), Cleanup()]).run(model(), PassContext(), [recorder])
    assert recorder.events == [
        "enter:4",
        "before:cleanup",
        "after:cleanup:True",
        "before:fold_batchnorm",
        "after:fold_batchnorm:True",
        "before:cleanup",
        "after:cleanup:True",
        "before:cleanup",
        "after:cleanup:False",
        "exit",
    ]


def test_failure_names_the_pass_and_those_before_it() -> None:
    recorder = Recorder()
    expected = r"pass 'explodes' failed \(passes run before it: cleanup, fold_batchnorm\)"
    with pytest.raises(PassFailedError, match=expected):
        Pipeline([Cleanup(), FoldBatchNorm(), Explodes()]).run(model(), PassContext(), [recorder])
    assert recorder.events[-1] == "exit"


def test_verify_numerics_accepts_lossless_passes_and_records_error() -> None:
    m, verify = model(), VerifyNumerics()
    records = Pipeline([Cleanup(), FoldBatchNorm()]).run(m, PassContext(), [verify])
    assert records[1].metrics["max_relative_error"] <= 1e-5
    assert records[1].metrics["sqnr_db"] > 90


def test_verify_numerics_catches_a_pass_beyond_its_tolerance() -> None:
    with pytest.raises(PassFailedError, match=r"scale_weights.*max relative error"):
        Pipeline([ScaleWeights(1.01)]).run(model(), PassContext(), [VerifyNumerics()])


def test_verify_numerics_uses_the_lossy_tolerance() -> None:
    lossy = Tolerance(max_relative_error=None, min_sqnr_db=20.0)
    records = Pipeline([ScaleWeights(1.01, lossy)]).run(model(), PassContext(), [VerifyNumerics()])
    assert 20.0 < records[0].metrics["sqnr_db"] < 80.0
    with pytest.raises(PassFailedError, match="SQNR"):
        Pipeline([ScaleWeights(2.0, lossy)]).run(model(), PassContext(), [VerifyNumerics()])


def test_verify_numerics_feeds_from_calibration_data(tmp_path: Path) -> None:
    m = model()
    context = PassContext(calibration=Dataset(npz(tmp_path, samples=3), input_specs(m)))
    records = Pipeline([FoldBatchNorm()]).run(m, context, [VerifyNumerics()])
    assert records[0].metrics["max_relative_error"] <= 1e-5


def test_timing_and_dump_ir(tmp_path: Path) -> None:
    m = model()
    reference = run_onnx(conv_bn_model(identity=True), {"input": random_input((2, 3, 8, 8))})
    records = Pipeline([Cleanup(), FoldBatchNorm()]).run(m, PassContext(), [Timing(), DumpIR(tmp_path / "dump")])
    assert all(r.seconds > 0 for r in records)
    files = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert files == ["000_input.onnx", "001_cleanup.onnx", "002_fold_batchnorm.onnx"]
    dumped = run_onnx(tmp_path / "dump" / "002_fold_batchnorm.onnx", {"input": random_input((2, 3, 8, 8))})
    assert_close(reference, dumped)


def test_dataset_errors_are_user_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, x=random_input((4, 3, 9, 9)))
    with pytest.raises(DataError, match="axis 2"):
        Dataset(path, input_specs(model()))


def test_long_steps_are_timed_and_named_on_stderr(small_calib: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = compress(conv_bn_model(), "int8", calib=small_calib, measure_latency=False, progress=True)
    shown = capsys.readouterr().err
    for step in ("calibrating", "int8 SQNR check", "timing int8 islands", "measuring the compressed model"):
        assert step in shown, step
    steps = result.report.steps
    assert {"calibration", "int8 SQNR check", "lowering", "latency guard", "measuring"} <= set(steps), steps
    assert all(seconds > 0 for seconds in steps.values()) and result.report.as_dict()["steps"] == steps
    compress(conv_bn_model(), "int8", calib=small_calib, measure_latency=False, progress=False)
    assert capsys.readouterr().err == ""
