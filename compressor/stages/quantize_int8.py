"""The int8 stage: optional cross-layer equalization, int8 PTQ with mixed precision, the latency guard.

Passes: `EqualizeCrossLayer` (``equalize``), then `QuantizeInt8`, whose
mixed-precision policy (`MixedPrecision`) keeps the most sensitive layers in
float while the output SQNR is below ``min_sqnr_db``. Once the passes ran,
on backends that time int8 islands, the latency guard puts back in float each
island that runs faster that way; a recipe that pins ``guard.float_islands``
(as the report's recipe does) applies that choice again without timing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from compressor.backends import Backend
from compressor.backends.latency_guard import LatencyGuard, int8_islands
from compressor.errors import ConfigError
from compressor.instruments import stage
from compressor.passes.equalize_cross_layer import EqualizeCrossLayer
from compressor.passes.quantize_int8 import QuantizeInt8
from compressor.passes.quantize_int16 import INT16_OPSET, QuantizeInt16
from compressor.passes.store_weights_int8 import StoreWeightsInt8, StoreWeightsInt8Config
from compressor.passes.upgrade_opset import UpgradeOpset, UpgradeOpsetConfig
from compressor.pipeline import Pass, PassContext
from compressor.quantization.int8_config import QuantizeInt8Config
from compressor.quantization.int16_config import QuantizeInt16Config
from compressor.quantization.sensitivity import LayerSensitivity, MixedPrecision
from compressor.report import Report
from compressor.stages.base import Settled, Stage

PINNED_WHY = "int8 island ran slower than float when this recipe was recorded (guard.float_islands)"


class QuantizeInt8Stage(Stage):
    """int8 post-training quantization (QDQ form, lowered by the backend)."""

    kind = "quantize_int8"
    config_class = QuantizeInt8Config
    target = "int8"
    rank = 30

    def __init__(self, config: QuantizeInt8Config) -> None:
        super().__init__(config)
        self.equalize = EqualizeCrossLayer() if config.equalize else None
        wants_ranking = config.min_sqnr_db is not None or config.explain
        self.mixed = MixedPrecision(explain=config.explain) if wants_ranking else None
        self.quantize = QuantizeInt8(config, choose_float=self.mixed)
        self.fallback = _int16_fallback(config, self.quantize) if config.fallback == "int16" else None
        self.guard: LatencyGuard | None = None

    @classmethod
    def defaults(cls, backend: Backend) -> Mapping[str, object]:
        return backend.int8_preferences

    def passes(self, backend: Backend) -> list[Pass]:
        passes: list[Pass] = [self.equalize, self.quantize] if self.equalize is not None else [self.quantize]
        if self.fallback is not None:
            passes = [UpgradeOpset(UpgradeOpsetConfig(min_opset=INT16_OPSET)), *passes, self.fallback]
        return passes

    def settle(
        self,
        model: ir.Model,
        backend: Backend,
        context: PassContext,
        float_islands: tuple[str, ...] | None,
        time_islands: bool,
    ) -> Settled:
        if self.fallback is not None:
            return Settled(model)  # no float islands for speed: the model stays integer
        if float_islands is not None:
            return self._pinned(model, backend, frozenset(float_islands), context)
        if not (time_islands and backend.times_int8_islands and context.calibration is not None):
            return Settled(model)
        self.guard = LatencyGuard(backend, context.calibration.first_batch(1))
        model, lowered, slower = keep_faster_islands(self.guard, self.quantize, backend, model, context)
        return Settled(model, lowered, tuple(sorted(slower)))

    def _pinned(
        self, model: ir.Model, backend: Backend, float_islands: frozenset[str], context: PassContext
    ) -> Settled:
        if not float_islands:
            return Settled(model, None, ())
        known = frozenset().union(*int8_islands(model))
        unknown = sorted(float_islands - known)
        if unknown:
            raise ConfigError(f"guard.float_islands: {unknown[0]!r} is not an int8 node of this model; remove it")
        variant, stored = _floated(self.quantize, backend, float_islands, context)
        self.quantize.skipped.update(dict.fromkeys(float_islands, PINNED_WHY))
        self.quantize.skipped.update(dict.fromkeys(stored, f"{PINNED_WHY}; its weights stay int8, dequantized at load"))
        return Settled(variant, None, tuple(sorted(float_islands)))

    def report(self, report: Report, backend: Backend) -> None:
        report.kept_float.update(self.quantize.skipped)
        records = {record["name"]: record for record in report.passes}
        if self.fallback is not None:
            self._report_fallback(report, records[self.fallback.name])
        if self.equalize is not None:
            record = records[self.equalize.name]
            record["equalized"], record["rejections"] = self.equalize.equalized, self.equalize.rejections
        record = records[self.quantize.name]
        if self.mixed is not None:
            record["sensitivity"] = [layer.as_dict() for layer in self.mixed.sensitivity]
            record["mixed_precision"] = [{"kept_float": list(k), "sqnr_db": db} for k, db in self.mixed.history]
        rounding = self.quantize.rounding
        if rounding is not None:
            record["rounding"] = [layer.as_dict() for layer in rounding.records]
            record["rounding_rescued"] = self.quantize.rescued
            few = rounding.underdetermined()
            if few:
                report.notes.append(
                    f"rounding: {len(few)} layer(s) kept rounding to nearest, with fewer calibration rows than "
                    f"inputs (the first: {few[0].node}, {few[0].rows} rows for {few[0].fan_in} inputs, from "
                    f"{rounding.samples} samples); pass more calibration samples to round them"
                )
            diverged = [r.node for r in rounding.records if "diverged" in r.outcome]
            if diverged:
                report.notes.append(f"rounding diverged on {', '.join(diverged)}: rounded to nearest there")
        if self.guard is not None:
            record["latency_guard"] = [{"kept_float": list(k), "speedup": x} for k, x in self.guard.history]
            record["latency_guard_untried_islands"] = self.guard.untried

    def _report_fallback(self, report: Report, record: dict) -> None:
        converted = self.fallback.converted
        for name in converted:
            report.kept_float.pop(name, None)
        record["int16"] = converted
        left = sorted(report.kept_float)
        summary = f"int16 fallback: {len(converted)} node(s) int8 left in float run in INT16 dynamic fixed point"
        report.notes.append(summary + (f"; {len(left)} stay float (the first: {left[0]})" if left else ""))

    @property
    def reference_outputs(self) -> Sequence[np.ndarray]:
        return self.quantize.calibrated.outputs if self.quantize.calibrated is not None else ()

    @property
    def sensitivity(self) -> list[LayerSensitivity]:
        return self.mixed.sensitivity if self.mixed is not None else []


def _int16_fallback(config: QuantizeInt8Config, quantize: QuantizeInt8) -> QuantizeInt16:
    """The int16 pass for what ``quantize`` leaves in float, calibrated like it (int16 has minmax and percentile)."""
    method = "percentile" if config.calibration == "percentile" else "minmax"
    settings = QuantizeInt16Config(calibration=method, num_samples=config.num_samples, batch_size=config.batch_size)
    fallback = QuantizeInt16(settings, select=lambda: frozenset(quantize.skipped))
    fallback.name = "int16_fallback"
    return fallback


def keep_faster_islands(
    guard: LatencyGuard, quantize: QuantizeInt8, backend: Backend, model: ir.Model, context: PassContext | None = None
) -> tuple[ir.Model, onnx.ModelProto | None, frozenset[str]]:
    """``model`` with the int8 islands that run faster in float on ``backend`` put back in float.

    Their convs still store int8 weights (`StoreWeightsInt8`) where the backend dequantizes them at load.
    Also returns the model's lowering when the backend's last lowering was of it (no island tried), else
    None, and the nodes put in float.
    """
    islands = int8_islands(model)
    if not islands:
        return model, None, frozenset()
    # The float IR, not the file as given: onnxruntime reading a file with its weights inline held
    # 45 MB more at the peak on ResNet-18, and it was no faster.
    reference = quantize.float_model()  # lowered for each timing, so no fp32 proto is held beside the sessions
    with stage("lowering", f" for {backend.name}", context):
        lowered = backend.lower(model)  # last, so the backend's record of its rewrites is this model's
    with stage("latency guard", ": timing int8 islands against fp32", context):
        slower = guard(
            reference, lowered, lambda also_float: backend.lower(_floated(quantize, backend, also_float)[0]), islands
        )
    if not slower:
        return model, lowered if len(guard.history) == 1 else None, slower
    gain = f"in float the model ran {guard.gain:.2f}x faster: {guard.speedup:.2f}x fp32"
    why = f"int8 island ran slower than float ({gain})"
    variant, stored = _floated(quantize, backend, slower, context or PassContext.current())
    quantize.skipped.update(dict.fromkeys(slower, why))
    quantize.skipped.update(dict.fromkeys(stored, f"{why}; its weights stay int8, dequantized at load"))
    return variant, None, slower


def _floated(
    quantize: QuantizeInt8, backend: Backend, also_float: frozenset[str], final: PassContext | None = None
) -> tuple[ir.Model, list[str]]:
    """The quantized model again with ``also_float`` in float, and the nodes whose weights still store int8.

    ``final``: this is the model kept, so rounding optimisation (if on) reruns around the float nodes.
    """
    variant, store = quantize.variant(also_float, final), StoreWeightsInt8(StoreWeightsInt8Config(also_float))
    if backend.dequantizes_weights_at_load:
        store(variant)
    return variant, store.stored
