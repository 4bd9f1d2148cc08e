"""Annotate every value with its inferred type and shape (ONNX shape inference).

Symbolic dims such as the batch stay symbolic in the model; analyses that
need numbers (MACs) resolve them on a copy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx
import onnx_ir as ir
from onnx_ir.passes import PassResult

from compressor.pipeline import Pass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferShapesConfig:
    """Options passed to ONNX shape inference."""

    data_prop: bool = True


class InferShapes(Pass):
    """Run ONNX shape inference; only annotations change, never numerics.

    onnx-ir's ShapeInferencePass merges back only ``dtype`` and ``shape``, which turns
    sequence-typed values (SplitToSequence, SequenceConstruct, ...) into tensors and
    makes the model invalid; this pass merges the whole inferred ``type``.
    """

    name = "infer_shapes"
    config_class = InferShapesConfig
    config: InferShapesConfig

    def call(self, model: ir.Model) -> PassResult:
        proto = ir.to_proto(model)
        # Inference needs only the initializers' types: list them as inputs and drop their data.
        listed = {i.name for i in proto.graph.input}
        for tensor in proto.graph.initializer:
            if tensor.name not in listed:
                proto.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
        del proto.graph.initializer[:]
        try:
            inferred = onnx.shape_inference.infer_shapes(
                proto, check_type=True, strict_mode=True, data_prop=self.config.data_prop
            )
        except (onnx.shape_inference.InferenceError, RuntimeError) as exc:
            logger.warning("shape inference failed, model left unchanged: %s", exc)
            return PassResult(model, False)
        modified = False
        inferred_model = ir.serde.deserialize_model(inferred)
        for graph, inferred_graph in zip(model.graphs(), inferred_model.graphs(), strict=True):
            known = ir.convenience.create_value_mapping(inferred_graph)
            for name, value in ir.convenience.create_value_mapping(graph).items():
                new = known.get(name)
                if new is None:
                    continue
                if new.type is not None and value.type != new.type:
                    value.type = new.type
                    modified = True
                if new.shape is not None and value.shape != new.shape:
                    value.shape = new.shape
                    modified = True
        return PassResult(model, modified)
