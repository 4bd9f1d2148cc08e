"""`QuantizeInt16Config`: the INT16 dynamic-fixed-point stage of a recipe, and the tuner's part of it."""

from __future__ import annotations

from dataclasses import dataclass, field

from compressor.config import tunable
from compressor.errors import UsageError

INT16_CALIBRATION = ("minmax", "percentile")


@dataclass(frozen=True)
class QuantizeInt16Config:
    """INT16 dynamic fixed point: int16 mantissas with power-of-two exponents (`passes.quantize_int16`).

    Activation exponents come from the calibrated range (``calibration``: the
    largest magnitude seen, or a high percentile of it); weight exponents from
    max |w|, one per output channel with ``per_channel``. ``headroom_bits`` raises every
    calibrated activation exponent by that many bits, so inputs up to ``2**headroom_bits``
    times beyond the calibrated range still fit instead of saturating, at about 6 dB of
    in-range SQNR a bit.
    """

    calibration: str = tunable("minmax", INT16_CALIBRATION)
    percentile: float = tunable(99.999, (99.99, 99.999))  # for calibration="percentile"
    num_samples: int = tunable(256, (64, 128, 256, 512))  # calibration samples read
    per_channel: bool = tunable(True, (False, True))
    headroom_bits: int = tunable(1, (0, 1, 2))
    keep_float: frozenset[str] = field(default_factory=frozenset)  # node names left in float
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.calibration not in INT16_CALIBRATION:
            raise UsageError(
                f"int16 config: calibration={self.calibration!r} is not one of {', '.join(INT16_CALIBRATION)}"
            )
        if not 50.0 < self.percentile <= 100.0:
            raise UsageError(f"int16 config: percentile={self.percentile} must be in (50, 100]")
        if not 0 <= self.headroom_bits <= 8:
            raise UsageError(f"int16 config: headroom_bits={self.headroom_bits} must be in [0, 8]")
        if self.num_samples < 1 or self.batch_size < 1:
            raise UsageError("int16 config: num_samples and batch_size must be >= 1")
