"""Upgrade the default-domain opset to at least 13.

Per-channel QuantizeLinear/DequantizeLinear (the ``axis`` attribute) needs
opset 13; onnxruntime's own quantizer emits invalid graphs below it. The ONNX
version converter does the work; this pass decides when and reports failures
as a user-facing error.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnx_ir as ir
from onnx_ir.passes import PassResult

from compressor import ir as cir
from compressor.errors import ModelError
from compressor.pipeline import Pass


@dataclass(frozen=True)
class UpgradeOpsetConfig:
    """The lowest default-domain opset the rest of the pipeline accepts."""

    min_opset: int = 13


class UpgradeOpset(Pass):
    """Convert a model below ``min_opset`` to exactly ``min_opset`` (lossless)."""

    name = "upgrade_opset"
    config_class = UpgradeOpsetConfig
    config: UpgradeOpsetConfig

    def call(self, model: ir.Model) -> PassResult:
        current = default_opset(model)
        if current >= self.config.min_opset:
            return PassResult(model, False)
        try:
            converted = onnx.version_converter.convert_version(cir.to_proto(model), self.config.min_opset)
        except (RuntimeError, ValueError, onnx.version_converter.ConvertError) as exc:
            raise ModelError(
                f"cannot upgrade the model from opset {current} to {self.config.min_opset} "
                f"({str(exc).splitlines()[0][:160]}); re-export it with opset >= {self.config.min_opset}"
            ) from None
        upgraded = ir.serde.deserialize_model(converted)
        model.graph = upgraded.graph
        # The converter keeps the IR version, and opset 13 needs IR version 7.
        needed = onnx.helper.find_min_ir_version_for(converted.opset_import, ignore_unknown=True)
        model.ir_version = max(model.ir_version, upgraded.ir_version, needed)
        return PassResult(model, True)


def default_opset(model: ir.Model) -> int:
    """The model's opset for the default ONNX domain."""
    imports = model.opset_imports
    return imports.get("", imports.get("ai.onnx", 1))
