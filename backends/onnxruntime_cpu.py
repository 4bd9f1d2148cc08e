"""onnxruntime on the CPU (MLAS kernels).

fp32 models are handed over as they are; onnxruntime's own graph optimisations
do the rest. Quantized (QDQ) models are lowered to fused integer operators
(QLinearConv with the activation folded into its output range, QLinearAdd,
QLinearGlobalAveragePool, QLinearConcat, QGemm, integer MaxPool/Reshape), the
form that runs fastest here. ``qdq=True`` keeps the portable QDQ form instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar

import onnx
import onnx_ir as ir

from compressor import ir as cir
from compressor.backends.base import Backend, to_proto
from compressor.backends.qlinear import lower_to_qlinear


class OnnxruntimeCPU(Backend):
    """CPUExecutionProvider with a fixed thread count (default 2).

    Fast paths on x86 (measured with AVX512-VNNI, see DESIGN.md §5): u8
    activations with s8 weights kept to 7 bits; full-range s8 weights and s8
    activations fall off the fast kernels.
    """

    name = "cpu"
    providers = ("CPUExecutionProvider",)
    int8_preferences: ClassVar[Mapping[str, object]] = MappingProxyType(
        {"activations": "asymmetric_uint8", "weights": "symmetric", "weight_bits": 7}
    )

    @property
    def times_int8_islands(self) -> bool:
        return not self.qdq  # the fused integer graph is the one whose speed varies by model

    def lower(self, model: ir.Model) -> onnx.ModelProto:
        if self.qdq or not any(node.op_type == "QuantizeLinear" for node in model.graph):
            return to_proto(model)
        working = ir.serde.deserialize_model(cir.to_proto(model))
        self.rejected = lower_to_qlinear(working)
        return to_proto(working)
