"""int8 post-training quantization into QDQ form: the pass.

The rewrite itself (`compressor.quantization.int8`) is shared with the
sensitivity analysis and the latency guard's variants; this pass calibrates on
the context's data, asks its mixed-precision policy which further nodes to keep
in float, and rewrites the model in place. The QDQ graph is the portable form
onnxruntime runs as is; the CPU backend lowers it further to fused QLinear*
operators.

Relu/Clip that are the sole consumer of a quantized op are fused: the tensor
after the activation is quantized instead of the one before it, so the
activation disappears into the output range when lowered.
"""

from __future__ import annotations

from dataclasses import replace

import onnx_ir as ir
from onnx_ir.passes import PassResult

from compressor.errors import ModelError
from compressor.instruments import stage
from compressor.pipeline import Pass, PassContext, Tolerance
from compressor.quantization.int8 import (
    CalibrationStats,
    FloatChooser,
    QuantizeInt8Config,
    apply_quantization,
    calibrate,
)
from compressor.quantization.params import QuantParams
from compressor.quantization.plan import QuantizationPlan
from compressor.quantization.rounding import RoundingResult, optimize_rounding

__all__ = ["ALREADY_QUANTIZED_OPS", "CalibrationStats", "QuantizeInt8", "QuantizeInt8Config", "calibrate"]

ALREADY_QUANTIZED_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm"}
)


class QuantizeInt8(Pass):
    """Calibrate on the context's data (or use given ``stats``) and rewrite the model into int8 QDQ form.

    ``choose_float``, when given, is asked which further nodes to keep in float
    once the statistics are known (the mixed-precision search of
    `compressor.quantization.sensitivity.MixedPrecision`); its reasons land in ``skipped``.
    """

    name = "quantize_int8"
    needs = frozenset({"calibration"})
    tolerance = Tolerance(max_relative_error=None, min_sqnr_db=10.0)

    def __init__(
        self,
        config: QuantizeInt8Config | None = None,
        stats: CalibrationStats | None = None,
        choose_float: FloatChooser | None = None,
    ) -> None:
        super().__init__()
        self.config = config or QuantizeInt8Config()
        self.stats = stats
        self.choose_float = choose_float
        self.params: dict[str, QuantParams] = {}
        self.skipped: dict[str, str] = {}  # node name -> why it stayed in float
        self.corrected: dict[str, float] = {}  # node name -> max |bias correction|
        self.calibrated: CalibrationStats | None = None  # the statistics the last run used
        self.rounding: RoundingResult | None = None  # what rounding optimisation did (``config.rounding``)
        self.rescued: list[str] = []  # layers the float search kept with nearest rounding, not after rounding
        self.applied: QuantizeInt8Config | None = None  # the config the last run used, float choices included
        self._float_model: ir.Model | None = None  # a clone: the pass then quantizes the model in place

    def requires(self, model: ir.Model) -> None:
        found = sorted({n.op_type for n in model.graph if n.op_type in ALREADY_QUANTIZED_OPS})
        if found:
            raise ModelError(f"the model is already quantized (it has {', '.join(found)}); pass the float model")

    def call(self, model: ir.Model) -> PassResult:
        plan = QuantizationPlan.build(model.graph, self.config)
        self.skipped = plan.skipped
        if not plan.tensors:
            return PassResult(model, False)
        stats, self.rounding = self.stats, None
        if stats is None:
            context = PassContext.current()
            if context.calibration is None:
                raise ModelError("int8 quantization needs calibration data: pass --calib DATA.npz")
            stats = calibrate(model, context.calibration, self.config)
        config = self.config
        nearest = stats
        if config.rounding != "nearest" and not stats.rounded:
            stats = self._round(model, stats, config, PassContext.current())
        self.calibrated = stats
        self._float_model = model.clone()  # shares the tensors: quantization replaces, never writes to, them
        # What rounding to nearest would have kept in float, asked first so the policy's record is the final run's.
        without = self.choose_float(self._float_model, nearest, config) if self.choose_float and self.rounding else {}
        extra = dict(self.choose_float(self._float_model, stats, config)) if self.choose_float else {}
        self.rescued = sorted(set(without) - set(extra))
        if extra:
            config = replace(config, keep_float=config.keep_float | frozenset(extra))
        applied = apply_quantization(model, config, stats)
        self.params, self.corrected, self.applied = applied.params, applied.corrected, config
        self.skipped = {**applied.skipped, **extra}
        return PassResult(model, True)

    def _round(
        self, model: ir.Model, stats: CalibrationStats, config: QuantizeInt8Config, context: PassContext
    ) -> CalibrationStats:
        if context.calibration is None:
            raise ModelError("rounding optimisation needs calibration data: pass --calib DATA.npz")
        with stage("rounding", f": {config.rounding} on {config.num_samples} samples", context, announce=False):
            self.rounding = optimize_rounding(model, context.calibration, config, stats, context.progress)
        return replace(stats, rounded=self.rounding.weights)

    def float_model(self) -> ir.Model:
        """The model as the last run received it, before quantization (a new IR model, tensors shared)."""
        if self._float_model is None:
            raise RuntimeError("QuantizeInt8.float_model needs a completed run")
        return self._float_model.clone()

    def variant(self, also_float: frozenset[str], context: PassContext | None = None) -> ir.Model:
        """The last run's model again, with the nodes ``also_float`` left in float too (same statistics).

        With ``context`` (for its calibration data) and rounding optimisation on, the layers are
        rounded again around the new float ones, and that becomes the pass's rounding: layers
        rounded to absorb an int8 neighbour's error make things worse once that neighbour is float
        (EfficientNet-Lite0's stem in float after rounding: 30.7 dB down to 24.4 on calibration data).
        """
        if self.applied is None or self.calibrated is None:
            raise RuntimeError("QuantizeInt8.variant needs a completed run")
        model = self.float_model()
        config = replace(self.applied, keep_float=self.applied.keep_float | also_float)
        stats = self.calibrated
        if context is not None and self.rounding is not None and also_float:
            stats = self._round(model, replace(stats, rounded={}), config, context)
            self.calibrated = stats
        apply_quantization(model, config, stats)
        return model
