"""Fold small nodes whose inputs are all known at compile time into initializers.

torch's unoptimised exports compute constants in the graph (a bias-free Conv gets
``Expand(CastLike(0, x), Shape(W))`` as bias), which hides them from passes that
need constants, such as FoldBatchNorm. ``Shape`` of a static shape and
``CastLike`` (which reads only its second input's type) count as known.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator
from onnx_ir.passes import PassResult

from compressor.ir import add_initializer, constant_array
from compressor.pipeline import Pass

# Deterministic ops that exporters use to compute constants. Random ops and
# Quantize/DequantizeLinear are deliberately absent: folding them would change
# results or undo quantization.
FOLDABLE_OPS = frozenset(
    {
        "Add", "Cast", "CastLike", "Concat", "ConstantOfShape", "Div", "Equal", "Expand", "Gather", "Identity",
        "Mul", "Neg", "Pow", "Range", "Reciprocal", "Reshape", "Shape", "Slice", "Sqrt", "Squeeze", "Sub",
        "Transpose", "Unsqueeze", "Where",
    }
)  # fmt: skip


@dataclass(frozen=True)
class FoldConstantsConfig:
    """Skip outputs larger than this many elements, so folding never bloats the model."""

    max_elements: int = 1 << 20


class FoldConstants(Pass):
    """Replace constant subexpressions by initializers (lossless; VerifyNumerics checks it)."""

    name = "fold_constants"
    config_class = FoldConstantsConfig
    config: FoldConstantsConfig

    def call(self, model: ir.Model) -> PassResult:
        modified = False
        opset = model.opset_imports.get("", 13)
        for node in list(model.graph):
            if node.domain not in ("", "ai.onnx") or node.op_type not in FOLDABLE_OPS:
                continue
            if node.op_type == "Shape" and _static_shape(node.inputs[0]) is not None:
                start = node.attributes["start"].as_int() if "start" in node.attributes else 0
                end = node.attributes["end"].as_int() if "end" in node.attributes else None
                results = [np.array(_static_shape(node.inputs[0])[start:end], dtype=np.int64)]
            elif node.op_type == "CastLike" and node.inputs[1] is not None and node.inputs[1].dtype is not None:
                value = constant_array(node.inputs[0])
                if value is None:
                    continue
                results = [value.astype(node.inputs[1].dtype.numpy())]
            else:
                arrays = [constant_array(v) if v is not None else None for v in node.inputs]
                missing = any(a is None and v is not None for a, v in zip(arrays, node.inputs, strict=True))
                if missing:
                    continue
                results = _evaluate(node, arrays, opset)
            if any(r.size > self.config.max_elements for r in results):
                continue
            if any(out.is_graph_output() for out in node.outputs):
                continue
            for out, array in zip(node.outputs, results, strict=True):
                folded = add_initializer(model.graph, f"{out.name}_folded", array)
                ir.convenience.replace_all_uses_with(out, folded)
            modified = True
        return PassResult(model, modified)


def _static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    const = ir.convenience.get_const_tensor(value)
    if const is not None:
        return tuple(const.shape.numpy())
    if value.shape is None or not all(isinstance(d, int) for d in value.shape):
        return None
    return tuple(value.shape)



def _evaluate(node: ir.Node, arrays: list[np.ndarray | None], opset: int) -> list[np.ndarray]:
    proto = ir.serde.serialize_node(node)
    names = [f"i{k}" if a is not None else "" for k, a in enumerate(arrays)]
    outs = [f"o{k}" for k in range(len(node.outputs))]
    del proto.input[:]
    proto.input.extend(names)
    del proto.output[:]
    proto.output.extend(outs)
    evaluator = ReferenceEvaluator(
        onnx.helper.make_model(
            onnx.helper.make_graph(
                [proto], "fold", [], [onnx.helper.make_value_info(o, onnx.TypeProto()) for o in outs]
            ),
            opset_imports=[onnx.helper.make_opsetid("", opset)],
        )
    )
    feeds = {n: a for n, a in zip(names, arrays, strict=True) if a is not None}
    return [np.asarray(r) for r in evaluator.run(None, feeds)]
