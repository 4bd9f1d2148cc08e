"""The int16 stage: the opset upgrade INT16 QDQ needs, then INT16 dynamic fixed point (`QuantizeInt16`)."""

from __future__ import annotations

from compressor.backends import Backend
from compressor.passes.quantize_int16 import INT16_OPSET, QuantizeInt16
from compressor.passes.upgrade_opset import UpgradeOpset, UpgradeOpsetConfig
from compressor.pipeline import Pass
from compressor.quantization.int16_config import QuantizeInt16Config
from compressor.report import Report
from compressor.stages.base import Stage


class QuantizeInt16Stage(Stage):
    """INT16 dynamic fixed point: int16 mantissas with power-of-two exponents, in portable QDQ form."""

    kind = "quantize_int16"
    config_class = QuantizeInt16Config
    target = "int16"
    rank = 30

    def __init__(self, config: QuantizeInt16Config) -> None:
        super().__init__(config)
        self.quantize = QuantizeInt16(config)

    def passes(self, backend: Backend) -> list[Pass]:
        return [UpgradeOpset(UpgradeOpsetConfig(min_opset=INT16_OPSET)), self.quantize]

    def report(self, report: Report, backend: Backend) -> None:
        report.kept_float.update(self.quantize.skipped)
        record = next(r for r in report.passes if r["name"] == self.quantize.name)
        exponents = self.quantize.exponents
        record["activations"] = len(exponents)
        record["exponents"] = dict(sorted(exponents.items()))
        if self.quantize.skipped:
            first = next(iter(self.quantize.skipped))
            report.notes.append(
                f"int16: {len(self.quantize.skipped)} node(s) run as float islands (the first: {first}, "
                f"{self.quantize.skipped[first]}); the integer reference cannot run this model"
            )
