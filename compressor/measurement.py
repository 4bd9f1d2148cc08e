"""The report's measurements: the compressed model against the original, on the same backend.

Size, MACs and params always; latency and fidelity (accuracy, top-1 agreement,
SQNR) when the recipe's ``measure`` settings ask for them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from compressor import ir as cir
from compressor import runtime
from compressor.backends import Backend
from compressor.metrics import compare_outputs, compute_cost, model_size_bytes, top1_accuracy, top1_agreement
from compressor.pipeline import PassContext
from compressor.report import Report, Row

FIDELITY_BATCH_ELEMENTS = 2**20  # input values per batch when measuring: 6 images at 224x224, 32 at 28x28
EVAL_LIMIT_WITHOUT_EVAL_SET = 128  # calibration samples re-run for the report when no --eval is given


class Original:
    """The model as given: size and cost measured on entry, and what a session on it runs.

    A file input is not held through every pass: onnxruntime reads the file again if the report needs it.
    Its size is its bytes on disk.
    """

    __slots__ = ("cost", "runnable", "shapes", "size")

    def __init__(
        self,
        model: str | os.PathLike | ir.Model | onnx.ModelProto,
        working: ir.Model,
        shapes: Mapping[str, Sequence[int]] | None,
    ) -> None:
        """``shapes``: the input sizes MACs are counted at (`cost_shapes`); None where they are not known."""
        proto = cir.to_proto(working)
        self.shapes = shapes
        self.cost = compute_cost(proto, shapes)
        if isinstance(model, (str, os.PathLike)):
            self.size, self.runnable = cir.file_bytes(model, working), str(model)
        else:
            self.size, self.runnable = model_size_bytes(proto), proto


def summary(
    report: Report,
    original: Original,
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
    before, after = original.cost, compute_cost(compressed, original.shapes)
    macs = (before.macs, after.macs) if original.shapes is not None else (None, None)
    if original.shapes is None:
        report.notes.append(f"MACs not counted: {_open_sizes(specs)}; pass --eval data or --input-shape")
    report.rows += [
        Row("size", original.size, model_size_bytes(lowered), "bytes"),
        Row("MACs (batch 1)", *macs, "count"),
        Row("params", before.params, after.params, "count"),
    ]
    data = context.evaluation or context.calibration
    if measure_latency:
        feeds = data.first_batch(1) if data is not None else _random_feeds(report, "latency", specs, 1, context.seed)
        if feeds is None:
            return
        fp32_latency, new_latency = backend.latency([original.runnable, lowered], feeds)
        label = f"latency (batch 1, {backend.threads} threads, median)"
        report.rows.append(Row(label, fp32_latency.median_ms, new_latency.median_ms, "ms"))


def cost_shapes(specs: Sequence[runtime.InputSpec], context: PassContext) -> dict[str, tuple[int, ...]] | None:
    """Input sizes to count MACs at: none needed, the data's, or None where the model leaves some open."""
    if not any(spec.symbolic_axes for spec in specs):
        return {spec.name: tuple(spec.shape) for spec in specs}  # type: ignore[misc]
    data = context.evaluation or context.calibration
    if data is None:
        return None
    return {name: tuple(array.shape) for name, array in data.first_batch(1).items()}


def _open_sizes(specs: Sequence[runtime.InputSpec]) -> str:
    spec = next(spec for spec in specs if spec.symbolic_axes)
    return f"input {spec.name} has symbolic " + ", ".join(str(spec.shape[a] or f"axis {a}") for a in spec.symbolic_axes)


def _random_feeds(
    report: Report, what: str, specs: Sequence[runtime.InputSpec], batch: int, seed: int
) -> dict[str, np.ndarray] | None:
    """Random inputs, or None (and a report note) where the model leaves a size after the batch open."""
    if any(spec.symbolic_axes for spec in specs):
        report.notes.append(f"{what} not measured: {_open_sizes(specs)}; pass --eval data or --input-shape")
        return None
    return runtime.random_feeds(specs, batch, seed)


def fidelity(
    report: Report,
    original: Original,
    lowered: onnx.ModelProto,
    backend: Backend,
    context: PassContext,
    specs: Sequence[runtime.InputSpec],
    known: Sequence[np.ndarray],
) -> None:
    """Fill the fidelity rows: top-1 accuracy (with labels), top-1 agreement and SQNR against the original.

    Runs on the eval data, else the first calibration samples, else random inputs; ``known`` holds float
    outputs calibration already computed for the first calibration samples.
    """
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
        feeds = _random_feeds(report, "accuracy and SQNR", specs, 32, context.seed)
        if feeds is None:
            return
        try:
            reference_logits.append(backend.run(backend.session(original.runnable), feeds)[0])
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no base class
            # Random values may be no valid input (a sample rate of 0, token ids out of range): the original
            # model itself refuses them, so there is nothing to compare against.
            message = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else type(exc).__name__
            report.notes.append(f"accuracy and SQNR not measured: the model refuses random inputs ({message}); "
                                "pass --eval data")  # fmt: skip
            return
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
