"""Weight-only int8: chosen float nodes keep float activations but store their weights in int8.

For the convs the latency guard puts back in float because int8 kernels ran
slower there. Their weights still take one byte each in the file, with a
float scale per output channel, behind a DequantizeLinear. The onnxruntime CPU
lowering turns that into a Cast and a Mul that onnxruntime folds when it
builds the session, so the node runs as the same float conv as before, on
weights that carry the int8 rounding error (8-bit, per channel: typically
40 dB and more of weight SQNR). Biases stay float.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir
from onnx_ir.passes import PassResult
from onnx_ir.passes.common import RemoveUnusedNodesPass

from compressor.ir import UniqueNames
from compressor.pipeline import Pass, Tolerance
from compressor.quantization.int8_config import QuantizeInt8Config
from compressor.quantization.params import quantize_weight_input
from compressor.quantization.plan import COMPUTE_OPS


@dataclass(frozen=True)
class StoreWeightsInt8Config:
    """``nodes``: names of the float Conv/Gemm/MatMul nodes whose weights go int8 (others are left alone)."""

    nodes: frozenset[str] = field(default_factory=frozenset)
    weight_bits: int = 8


class StoreWeightsInt8(Pass):
    """Symmetric per-channel int8 weights behind DequantizeLinear for the configured float nodes."""

    name = "store_weights_int8"
    tolerance = Tolerance(max_relative_error=None, min_sqnr_db=30.0)
    config_class = StoreWeightsInt8Config
    config: StoreWeightsInt8Config

    def __init__(self, config: StoreWeightsInt8Config | None = None) -> None:
        super().__init__(config)
        self.stored: list[str] = []  # names of the nodes whose weights went int8 in the last run

    def call(self, model: ir.Model) -> PassResult:
        quantization = QuantizeInt8Config(weights="symmetric", weight_bits=self.config.weight_bits, per_channel=True)
        names = UniqueNames(model.graph)
        self.stored = []
        for node in list(model.graph):
            if node.name in self.config.nodes and _has_float_constant_weight(node):
                quantize_weight_input(model.graph, node, quantization, names=names)
                self.stored.append(node.name)
        if self.stored:
            RemoveUnusedNodesPass()(model)  # drops the float weights the int8 ones replaced
        return PassResult(model, bool(self.stored))


def _has_float_constant_weight(node: ir.Node) -> bool:
    if node.op_type not in COMPUTE_OPS or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return False
    weight = node.inputs[1]
    if weight is None or weight.const_value is None or weight.dtype != ir.DataType.FLOAT:
        return False
    return node.op_type != "MatMul" or len(weight.const_value.shape) == 2
