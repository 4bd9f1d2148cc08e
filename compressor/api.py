"""The Python API: `compress()` mirrors the ``compress`` command line."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from compressor import ir as cir
from compressor import runtime
from compressor.backends import Backend, get_backend
from compressor.data import Dataset, Samples
from compressor.errors import UsageError
from compressor.images import ImageFolder, Preprocess
from compressor.instruments import DumpIR, Instrument, ProgressBar, Timing, VerifyNumerics, stage
from compressor.latency_guard import LatencyGuard, int8_islands
from compressor.metrics import compare_outputs, compute_cost, model_size_bytes, top1_accuracy, top1_agreement
from compressor.passes import import_passes
from compressor.passes.equalize_cross_layer import EqualizeCrossLayer
from compressor.passes.quantize_int8 import QuantizeInt8, QuantizeInt8Config
from compressor.passes.store_weights_int8 import StoreWeightsInt8, StoreWeightsInt8Config
from compressor.pipeline import PassContext, Pipeline
from compressor.report import Report, Row
from compressor.sensitivity import LayerSensitivity, MixedPrecision

TARGETS = ("fp32", "int8", "int16")
IMPLEMENTED_TARGETS = ("fp32", "int8")
FIDELITY_BATCH_ELEMENTS = 2**20  # input values per batch when measuring: 6 images at 224x224, 32 at 28x28
EVAL_LIMIT_WITHOUT_EVAL_SET = 128  # calibration samples re-run for the report when no --eval is given


@dataclass
class Result:
    """What `compress` produced: the IR model, its lowering, and the measured report."""

    model: ir.Model
    lowered: onnx.ModelProto
    report: Report
    sensitivity: list[LayerSensitivity] = field(default_factory=list)  # int8: worst layer first, when ranked

    def save(self, path: str | os.PathLike, *, force: bool = False) -> list[Path]:
        """Write the lowered model atomically; refuses to overwrite unless ``force``."""
        written = cir.save_model(self.lowered, path, force=force)
        self.report.output = str(Path(path))
        return written


def compress(
    model: str | os.PathLike | ir.Model | onnx.ModelProto,
    target: str = "fp32",
    *,
    calib: str | os.PathLike | None = None,
    eval: str | os.PathLike | None = None,  # noqa: A002 - mirrors the CLI flag
    preprocess: str | None = None,
    backend: str = "cpu",
    verify: bool = False,
    seed: int = 0,
    dump_ir: str | os.PathLike | None = None,
    progress: bool | None = None,
    measure_latency: bool = True,
    measure_fidelity: bool = True,
    latency_guard: bool = True,
    threads: int = runtime.DEFAULT_THREADS,
    int8: Mapping[str, object] | None = None,
    qdq: bool = False,
    explain: bool = False,
    unimplemented: Iterable[str] = (),
) -> Result:
    """Compress an ONNX model for a backend and measure it against the original.

    ``model`` is a path, an `onnx_ir.Model` or an `onnx.ModelProto` (not modified).
    ``calib``/``eval`` are ``.npz`` files (``x`` and optional ``y``) or folders of
    images, read with ``preprocess`` (see `compressor.images.Preprocess.parse`). ``int8``
    overrides fields of `QuantizeInt8Config` (the backend's fast-path choices are
    the defaults); ``measure_latency`` and ``measure_fidelity`` turn off the
    report's timing and its accuracy/SQNR rows (each re-runs both models; a build
    that measures elsewhere skips them). ``qdq`` keeps the portable QDQ form instead of fused
    integer operators. The int8 path quantizes with bias correction (and, when
    ``equalize`` is set, equalizes Conv pairs first), then keeps the most sensitive layers in
    float while the output SQNR on calibration data is below
    ``int8={"min_sqnr_db": 30.0}`` (None turns the search off; at most
    ``max_float_fraction`` of the compute MACs). ``explain`` ranks every
    layer's sensitivity (``Result.sensitivity``) even when no search runs. With
    ``latency_guard`` (on backends that support it), each int8 island is timed
    and kept in float where the model runs faster that way. Raises a
    `CompressorError` subclass for bad input. ``unimplemented`` lists requested
    features (e.g. CLI flags) that do not exist yet, so they fail loudly.
    """
    if target not in TARGETS:
        raise UsageError(f"unknown target {target!r}; choose one of: {', '.join(TARGETS)}")
    requested = [*unimplemented] + ([f"--target {target}"] if target not in IMPLEMENTED_TARGETS else [])
    if requested:
        raise UsageError(f"{', '.join(requested)}: not implemented yet; use --target fp32 or int8 for now")
    chosen_backend = get_backend(backend, threads=threads, qdq=qdq)
    working = _load(model)
    original = _Original(model, working)
    specs = runtime.input_specs(working)
    context = PassContext(
        # Each batch is checked as it is read. Calibration data is first read by calibration, the first real
        # work; evaluation data only by the final report, so it is read through once up front instead.
        calibration=_dataset(calib, specs, preprocess, read_through=False),
        evaluation=_dataset(eval, specs, preprocess, read_through=True),
        backend=backend,
        seed=seed,
    )
    bar = ProgressBar(progress)
    context.progress = bar.enabled
    instruments: list[Instrument] = [Timing(), bar]
    if verify:
        instruments.append(VerifyNumerics())
    if dump_ir is not None:
        instruments.append(DumpIR(dump_ir))
    passes = import_passes()
    if target == "int8":
        config = int8_config(chosen_backend, int8)
        equalize = EqualizeCrossLayer() if config.equalize else None
        if equalize is not None:
            passes.append(equalize)
        mixed = MixedPrecision(explain=explain) if config.min_sqnr_db is not None or explain else None
        quantize = QuantizeInt8(config, choose_float=mixed)
        passes.append(quantize)
    records = Pipeline(passes).run(working, context, instruments)
    guard, lowered = None, None
    if target == "int8" and latency_guard and chosen_backend.times_int8_islands and context.calibration is not None:
        guard = LatencyGuard(chosen_backend, context.calibration.first_batch(1))
        working, lowered = _keep_faster_islands(guard, quantize, chosen_backend, working, context)
    if lowered is None:
        with stage("lowering", f" for {chosen_backend.name}", context):
            lowered = chosen_backend.lower(working)
    report = Report(
        model=str(model) if isinstance(model, (str, os.PathLike)) else "<in-memory model>",
        target=target,
        backend=chosen_backend.name,
        passes=[r.as_dict() for r in records],
    )
    sensitivity: list[LayerSensitivity] = []
    if target == "int8":
        report.kept_float = {**chosen_backend.rejected, **quantize.skipped}
        report.lowering = {rewrite: nodes for rewrite, nodes in chosen_backend.rewrites.items() if nodes}
        if equalize is not None:
            record = next(r for r in report.passes if r["name"] == equalize.name)
            record["equalized"], record["rejections"] = equalize.equalized, equalize.rejections
        if mixed is not None:
            sensitivity = mixed.sensitivity
            record = report.passes[-1]
            record["sensitivity"] = [layer.as_dict() for layer in sensitivity]
            record["mixed_precision"] = [{"kept_float": list(kept), "sqnr_db": db} for kept, db in mixed.history]
        if guard is not None:
            report.passes[-1]["latency_guard"] = [{"kept_float": list(kept), "speedup": x} for kept, x in guard.history]
    with stage("measuring", " the compressed model against the original", context):
        _measure(report, original, lowered, working, chosen_backend, context, specs, measure_latency)
        if measure_fidelity:
            known = quantize.calibrated.outputs if target == "int8" and quantize.calibrated is not None else ()
            _measure_fidelity(report, original, lowered, chosen_backend, context, specs, known)
    report.steps = {name: round(seconds, 4) for name, seconds in context.steps.items()}
    return Result(working, lowered, report, sensitivity)


def _keep_faster_islands(
    guard: LatencyGuard, quantize: QuantizeInt8, backend: Backend, model: ir.Model, context: PassContext | None = None
) -> tuple[ir.Model, onnx.ModelProto | None]:
    """``model`` with the int8 islands that run faster in float on ``backend`` put back in float.

    Their convs still store int8 weights (`StoreWeightsInt8`) where the backend dequantizes them at load.
    Also returns the model's lowering when the backend's last lowering was of it (no island tried), else None.
    """
    islands = int8_islands(model)
    if not islands:
        return model, None

    def floated(also_float: frozenset[str]) -> tuple[ir.Model, list[str]]:
        variant, store = quantize.variant(also_float), StoreWeightsInt8(StoreWeightsInt8Config(also_float))
        if backend.dequantizes_weights_at_load:
            store(variant)
        return variant, store.stored

    # The float IR, not the file as given: onnxruntime reading a file with its weights inline held
    # 45 MB more at the peak on ResNet-18, and it was no faster.
    reference = quantize.float_model()  # lowered for each timing, so no fp32 proto is held beside the sessions
    with stage("lowering", f" for {backend.name}", context):
        lowered = backend.lower(model)  # last, so the backend's record of its rewrites is this model's
    with stage("latency guard", ": timing int8 islands against fp32", context):
        slower = guard(reference, lowered, lambda also_float: backend.lower(floated(also_float)[0]), islands)
    if not slower:
        return model, lowered if len(guard.history) == 1 else None
    gain = f"in float the model ran {guard.gain:.2f}x faster: {guard.speedup:.2f}x fp32"
    why = f"int8 island ran slower than float ({gain})"
    variant, stored = floated(slower)
    quantize.skipped.update(dict.fromkeys(slower, why))
    quantize.skipped.update(dict.fromkeys(stored, f"{why}; its weights stay int8, dequantized at load"))
    return variant, None


def int8_config(backend: Backend, overrides: Mapping[str, object] | None = None) -> QuantizeInt8Config:
    """The backend's fast-path settings, then the user's overrides (unknown fields are a usage error)."""
    fields = {**backend.int8_preferences, **(overrides or {})}
    known = set(QuantizeInt8Config.__dataclass_fields__)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise UsageError(f"unknown int8 setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if "keep_float" in fields:
        fields["keep_float"] = frozenset(fields["keep_float"])  # type: ignore[arg-type]
    return QuantizeInt8Config(**fields)  # type: ignore[arg-type]


def _load(model: str | os.PathLike | ir.Model | onnx.ModelProto) -> ir.Model:
    if isinstance(model, ir.Model):
        return ir.serde.deserialize_model(cir.to_proto(model))
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    return cir.load_model(model)


def _dataset(
    path: str | os.PathLike | None, specs: Sequence[runtime.InputSpec], preprocess: str | None, read_through: bool
) -> Samples | None:
    if path is None:
        return None
    if Path(path).is_dir():
        dataset: Samples = ImageFolder(path, specs, Preprocess.parse(preprocess))
    elif preprocess:
        raise UsageError(f"--preprocess applies to image folders, and {path} is a file; drop --preprocess")
    else:
        dataset = Dataset(path, specs)
    if read_through:
        dataset.validate()
    return dataset


class _Original:
    """The model as given: size and cost measured on entry, and what a session on it runs.

    A file input is not held through every pass: onnxruntime reads the file again if the report needs it.
    Its size is its bytes on disk.
    """

    __slots__ = ("cost", "runnable", "size")

    def __init__(self, model: str | os.PathLike | ir.Model | onnx.ModelProto, working: ir.Model) -> None:
        proto = cir.to_proto(working)
        self.cost = compute_cost(proto)
        if isinstance(model, (str, os.PathLike)):
            self.size, self.runnable = cir.file_bytes(model, working), str(model)
        else:
            self.size, self.runnable = model_size_bytes(proto), proto


def _measure(
    report: Report,
    original: _Original,
    lowered: onnx.ModelProto,
    compressed: ir.Model,
    backend: Backend,
    context: PassContext,
    specs: Sequence[runtime.InputSpec],
    measure_latency: bool,
) -> None:
    """Fill the summary rows: size, MACs, params and latency.

    MACs and params are counted on the compressed IR (standard ONNX ops, so shape
    inference sees them) rather than on the backend's lowering.
    """
    before, after = original.cost, compute_cost(compressed)
    report.rows += [
        Row("size", original.size, model_size_bytes(lowered), "bytes"),
        Row("MACs (batch 1)", before.macs, after.macs, "count"),
        Row("params", before.params, after.params, "count"),
    ]
    data = context.evaluation or context.calibration
    if measure_latency:
        feeds = data.first_batch(1) if data is not None else runtime.random_feeds(specs, 1, context.seed)
        fp32_latency, new_latency = backend.latency([original.runnable, lowered], feeds)
        label = f"latency (batch 1, {backend.threads} threads, median)"
        report.rows.append(Row(label, fp32_latency.median_ms, new_latency.median_ms, "ms"))


def _measure_fidelity(
    report: Report,
    original: _Original,
    lowered: onnx.ModelProto,
    backend: Backend,
    context: PassContext,
    specs: Sequence[runtime.InputSpec],
    known: Sequence[np.ndarray],
) -> None:
    session = backend.session(lowered)
    reference_logits, logits, labels = [], [], []
    if context.evaluation is not None or context.calibration is not None:
        data = context.evaluation or context.calibration
        limit = None if context.evaluation is not None else min(EVAL_LIMIT_WITHOUT_EVAL_SET, data.num_samples)
        source = "eval" if context.evaluation is not None else "calib"
        if source == "calib" and known and len(known[0]) >= limit:
            reference_logits.append(known[0][:limit])  # calibration already ran the float model on these
        reference_session = None if reference_logits else backend.session(original.runnable)
        for batch in data.batches(batch_size=data.batch_size_for(FIDELITY_BATCH_ELEMENTS, 32), limit=limit):
            if reference_session is not None:
                reference_logits.append(backend.run(reference_session, batch.feeds)[0])
            logits.append(backend.run(session, batch.feeds)[0])
            if batch.labels is not None:
                labels.append(batch.labels)
    else:
        source = "random"
        feeds = runtime.random_feeds(specs, 32, context.seed)
        reference_logits.append(backend.run(backend.session(original.runnable), feeds)[0])
        logits.append(backend.run(session, feeds)[0])
    reference, output = np.concatenate(reference_logits), np.concatenate(logits)
    report.evaluation = {"source": source, "samples": int(reference.shape[0])}
    if labels and source == "eval":
        truth = np.concatenate(labels)
        report.rows.append(
            Row("top-1 accuracy", top1_accuracy(reference, truth), top1_accuracy(output, truth), "fraction")
        )
    if reference.ndim == 2 and reference.shape[1] > 1:
        report.rows.append(Row("top-1 agreement vs fp32", 1.0, top1_agreement(reference, output), "fraction"))
    comparison = compare_outputs([reference], [output])
    report.rows.append(Row("SQNR vs fp32", float("inf"), comparison.sqnr_db, "db"))
    report.evaluation["max_abs_error"] = comparison.max_abs_error
