"""`QuantizeInt8Config`: every setting of the int8 path, the recipe's int8 stage and the tuner's space."""

from __future__ import annotations

from dataclasses import dataclass, field

from compressor.config import tunable
from compressor.errors import UsageError
from compressor.quantization.calibration import METHODS as CALIBRATION_METHODS

ACTIVATION_SCHEMES = ("asymmetric_uint8", "symmetric_int8", "symmetric_uint8")
WEIGHT_SCHEMES = ("symmetric", "asymmetric")
ROUNDING_METHODS = ("nearest", "adaround")
FALLBACKS = ("float", "int16")


@dataclass(frozen=True)
class QuantizeInt8Config:
    """The int8 stage of a recipe: every setting of the int8 path, the tuner's space among them.

    Fields declared with `compressor.config.tunable` carry the domain the tuner
    searches (`compressor.config.search_space`). ``equalize`` (cross-layer
    equalization before calibration), the mixed-precision search
    (``min_sqnr_db``, ``max_float_fraction``, ``sensitivity_samples``) and
    ``explain`` are run around the quantize pass by the int8 stage
    (`compressor.stages.quantize_int8`); the pass itself reads the quantization
    fields and ``keep_float``.
    """

    calibration: str = tunable("minmax", CALIBRATION_METHODS)
    percentile: float = tunable(99.99, (99.9, 99.99, 99.999))  # for calibration="percentile"
    num_samples: int = tunable(256, (64, 128, 256, 512))  # calibration samples read
    activations: str = tunable("asymmetric_uint8", ACTIVATION_SCHEMES)
    weights: str = tunable("symmetric", WEIGHT_SCHEMES)
    weight_bits: int = tunable(7, (7, 8))  # 7 keeps onnxruntime's u8s8 kernels on their fast, overflow-free path
    power_of_two: bool = tunable(False, (False, True))
    per_channel: bool = tunable(True, (False, True))
    # With per_channel, a layer whose weights quantize this well (weight SQNR, dB) with one scale
    # gets one scale: per-channel scales cost 4 bytes a channel, about half a 3x3 depthwise
    # channel. A size-for-accuracy trade for the tuner, off by default: at 40 dB the
    # Fashion-MNIST MobileNetV2 gets 5% smaller and loses 2.4 dB of output SQNR.
    per_tensor_min_sqnr_db: float | None = tunable(None, (None, 40.0, 50.0))
    bias_correction: bool = tunable(True, (False, True))
    # Rounding optimisation (`compressor.quantization.rounding`): "adaround" learns, layer by layer on
    # the calibration data, whether each weight rounds up or down. ``rounding_bias`` then refits each
    # rounded layer's bias to the quantized model's inputs (AdaQuant's bias tuning, in closed form;
    # it replaces bias correction there), ``rounding_scale`` each output channel's weight scale.
    rounding: str = tunable("nearest", ROUNDING_METHODS)
    rounding_iterations: int = tunable(200, (100, 200, 500))  # optimisation steps per layer
    rounding_bias: bool = tunable(True, (False, True))
    rounding_scale: bool = tunable(False, (False, True))
    keep_float: frozenset[str] = field(default_factory=frozenset)  # node names left in float
    batch_size: int = 8
    # Cross-layer equalization first. Off by default: measured neutral to slightly harmful on the
    # demo, MobileNetV2 and EfficientNet-Lite0 once bias correction and mixed precision are on
    # (ReLU6 pairs can rarely be proven safe).
    equalize: bool = tunable(False, (False, True))
    # Mixed precision: while the model-output SQNR on calibration data is below this, keep the
    # most sensitive layers in float (None: never) while that helps, up to this fraction of the MACs.
    min_sqnr_db: float | None = tunable(30.0, (None, 25.0, 30.0, 35.0))
    max_float_fraction: float = tunable(0.1, (0.0, 0.05, 0.1, 0.2))  # of the compute MACs
    sensitivity_samples: int = 16  # calibration samples per model-SQNR measurement
    # Constant weights of ops with no int8 kernel (Gather tables, LSTM/GRU/RNN matrices: see
    # `plan.STORED_WEIGHT_INPUTS`) stored in int8, a scale per row, the op itself in float. For
    # backends that dequantize constant weights when they load the model
    # (`Backend.dequantizes_weights_at_load`); elsewhere every run would dequantize them again.
    int8_storage: bool = False
    explain: bool = False  # rank every layer's sensitivity for the report, even when no search runs
    # What the layers int8 leaves in float run in: float, or INT16 dynamic fixed point
    # (`passes.quantize_int16`), so that the whole model stays integer. With "int16" the latency guard
    # does not run: it would put int8 islands back in float, and the point is that nothing is float.
    fallback: str = tunable("float", FALLBACKS)

    def __post_init__(self) -> None:
        checks = {
            "calibration": (self.calibration, CALIBRATION_METHODS),
            "activations": (self.activations, ACTIVATION_SCHEMES),
            "weights": (self.weights, WEIGHT_SCHEMES),
            "weight_bits": (self.weight_bits, (7, 8)),
            "rounding": (self.rounding, ROUNDING_METHODS),
            "fallback": (self.fallback, FALLBACKS),
        }
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise UsageError(f"int8 config: {name}={value!r} is not one of {', '.join(map(str, allowed))}")
        if not 50.0 < self.percentile <= 100.0:
            raise UsageError(f"int8 config: percentile={self.percentile} must be in (50, 100]")
        if self.num_samples < 1:
            raise UsageError("int8 config: num_samples must be >= 1")
        if not 0.0 <= self.max_float_fraction <= 1.0:
            raise UsageError(f"int8 config: max_float_fraction={self.max_float_fraction} must be in [0, 1]")
        if self.rounding_iterations < 0:
            raise UsageError("int8 config: rounding_iterations must be >= 0")
        if self.sensitivity_samples < 1:
            raise UsageError("int8 config: sensitivity_samples must be >= 1")


# Weights that are only stored in int8 have no integer kernel to stay fast for: full 8 bits.
STORAGE = QuantizeInt8Config(weights="symmetric", weight_bits=8, per_channel=True)
