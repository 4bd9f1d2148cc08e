"""Fold an inference-mode BatchNormalization into the Conv that feeds it.

    y = gamma * (conv(x, W) + b - mean) / sqrt(var + eps) + beta
      = conv(x, W * s) + (b - mean) * s + beta,   s = gamma / sqrt(var + eps)

Pattern: Conv -> BatchNormalization. Checks (each rejection says why): the
Conv's weight, bias and every BN statistic are constants, the Conv output
feeds only this BN, and the BN is in inference mode (one output).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import PassResult

from compressor.ir import add_initializer, constant_array
from compressor.pipeline import Pass


@dataclass(frozen=True)
class FoldBatchNormConfig:
    """No options yet; kept so every pass is configured the same way."""


class FoldBatchNorm(Pass):
    """Rewrite Conv -> BatchNormalization as one Conv with adjusted weight and bias."""

    name = "fold_batchnorm"
    config_class = FoldBatchNormConfig
    config: FoldBatchNormConfig

    def __init__(self, config: FoldBatchNormConfig | None = None) -> None:
        super().__init__(config)
        self.rejections: list[str] = []

    def call(self, model: ir.Model) -> PassResult:
        self.rejections = []
        modified = False
        for node in list(model.graph):
            if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
                continue
            reason = self._fold(model.graph, node)
            if reason is None:
                modified = True
            else:
                self.rejections.append(f"{node.name or 'BatchNormalization'}: {reason}")
        return PassResult(model, modified)

    def _fold(self, graph: ir.Graph, bn: ir.Node) -> str | None:
        """Fold one BN; return why not, or None when folded."""
        conv = bn.inputs[0].producer() if bn.inputs[0] is not None else None
        if conv is None or conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx"):
            return "input is not produced by a Conv"
        if len(bn.outputs) != 1 or (bn.attributes.get("training_mode") and bn.attributes["training_mode"].as_int()):
            return "BatchNormalization is in training mode"
        if len(conv.outputs[0].uses()) != 1 or conv.outputs[0].is_graph_output():
            return "Conv output has other users"
        weight = constant_array(conv.inputs[1])
        if weight is None:
            return "weight of Conv is not constant"
        bias = constant_array(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2] is not None else None
        if len(conv.inputs) > 2 and conv.inputs[2] is not None and bias is None:
            return "bias of Conv is not constant"
        stats = [constant_array(v) for v in bn.inputs[1:5]]
        if any(s is None for s in stats):
            return "BatchNormalization statistics are not constant"
        gamma, beta, mean, var = (s.astype(np.float64) for s in stats)
        eps = bn.attributes["epsilon"].as_float() if "epsilon" in bn.attributes else 1e-5
        scale = gamma / np.sqrt(var + eps)
        if bias is None:
            bias = np.zeros(weight.shape[0], dtype=weight.dtype)
        new_weight = (weight.astype(np.float64) * scale.reshape(-1, *[1] * (weight.ndim - 1))).astype(weight.dtype)
        new_bias = ((bias.astype(np.float64) - mean) * scale + beta).astype(weight.dtype)

        base = conv.name or bn.outputs[0].name or "conv"
        weight_value = add_initializer(graph, f"{base}_bnfold_weight", new_weight)
        bias_value = add_initializer(graph, f"{base}_bnfold_bias", new_bias)
        folded = ir.Node(
            "",
            "Conv",
            [conv.inputs[0], weight_value, bias_value],
            attributes=list(conv.attributes.values()),
            name=conv.name,
        )
        ir.convenience.replace_nodes_and_values(graph, bn, [conv, bn], [folded], [bn.outputs[0]], [folded.outputs[0]])
        return None
