"""Annotate every value with its inferred type and shape (ONNX shape inference).

Symbolic dims such as the batch stay symbolic in the model; analyses that
need numbers (MACs) resolve them on a copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
from onnx_ir.passes import PassResult
from onnx_ir.passes.common import ShapeInferencePass

from compressor.pipeline import Pass


@dataclass(frozen=True)
class InferShapesConfig:
    """Options passed to ONNX shape inference."""

    data_prop: bool = True


class InferShapes(Pass):
    """Run ONNX shape inference; only annotations change, never numerics."""

    name = "infer_shapes"

    def __init__(self, config: InferShapesConfig | None = None) -> None:
        super().__init__()
        self.config = config or InferShapesConfig()

    def call(self, model: ir.Model) -> PassResult:
        return ShapeInferencePass(data_prop=self.config.data_prop)(model)
