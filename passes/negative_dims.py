"""Sizes written as ``-1`` (some exporters' "any size") become unknown dimensions.

ONNX spells an open size as a named (``dim_param``) or empty dimension; a
negative ``dim_value`` is a convention of some exporters that onnxruntime
accepts but shape inference and size arithmetic read as a number. Every value's
shape (inputs, outputs and intermediate values) gets an anonymous symbolic
dimension in its place, so the model's inputs stay open in the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
from onnx_ir.passes import PassResult

from compressor.pipeline import Pass


@dataclass(frozen=True)
class NegativeDimsConfig:
    """No settings."""


class NegativeDims(Pass):
    """Replace negative dimension sizes by unknown (symbolic) dimensions (lossless)."""

    name = "negative_dims"
    config_class = NegativeDimsConfig

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        values = [*graph.inputs, *graph.outputs, *(out for node in graph for out in node.outputs)]
        modified = False
        for value in values:
            shape = value.shape
            if shape is not None and any(isinstance(d, int) and d < 0 for d in shape):
                value.shape = ir.Shape([None if isinstance(d, int) and d < 0 else d for d in shape])
                modified = True
        return PassResult(model, modified)
