"""onnxruntime on the CPU (MLAS kernels).

For fp32 the lowering is the model itself; onnxruntime's own graph
optimisations do the rest. Integer lowerings land here with the int8 work.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from compressor.backends.base import Backend, to_proto


class OnnxruntimeCPU(Backend):
    """CPUExecutionProvider with a fixed thread count (default 2)."""

    name = "cpu"
    providers = ("CPUExecutionProvider",)

    def lower(self, model: ir.Model) -> onnx.ModelProto:
        return to_proto(model)
