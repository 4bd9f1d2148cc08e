"""Weights listed as graph inputs (IR version 3) become plain initializers, under an IR version that allows it.

Until IR version 4 every initializer also had to be a graph input, and old
exporters (opset 9 and before) wrote models that way. The folds that follow add
initializers of their own, which such a graph would have to list as inputs too,
and a weight that is also an input is, to onnxruntime and to the folds, an input
the caller may override rather than a constant. So the inputs that only name an
initializer are dropped and the model is raised to IR version 4, the first that
allows initializers which are not inputs; `UpgradeOpset` raises it further if the
opset needs it. IR version 4 and later keep such inputs (there the overridable
default is the model's choice).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
from onnx_ir.passes import PassResult

from compressor.pipeline import Pass

FIRST_IR_WITHOUT_WEIGHT_INPUTS = 4


@dataclass(frozen=True)
class WeightsAsInputsConfig:
    """No settings: the rewrite follows from the IR version."""


class WeightsAsInputs(Pass):
    """Drop the graph inputs of an IR-3 model that only carry initializers; raise it to IR version 4 (lossless)."""

    name = "weights_as_inputs"
    config_class = WeightsAsInputsConfig

    def call(self, model: ir.Model) -> PassResult:
        if model.ir_version >= FIRST_IR_WITHOUT_WEIGHT_INPUTS:
            return PassResult(model, False)
        graph = model.graph
        weights = [value for value in graph.inputs if value.name in graph.initializers]
        for value in weights:
            graph.inputs.remove(value)
        model.ir_version = FIRST_IR_WITHOUT_WEIGHT_INPUTS
        return PassResult(model, True)
