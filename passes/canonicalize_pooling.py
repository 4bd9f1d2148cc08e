"""Rewrite ReduceMean over the spatial axes of an NCHW tensor as GlobalAveragePool.

torch's dynamo exporter writes ``AdaptiveAvgPool2d(1)`` as ReduceMean(axes=[2, 3]);
the legacy exporter writes GlobalAveragePool. Backends have quantized kernels for
the latter only, so every model is brought to that one form. With keepdims=0 a
Flatten restores the rank-2 result. Lossless up to summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
from onnx_ir.passes import PassResult

from compressor.pipeline import Pass


@dataclass(frozen=True)
class CanonicalizePoolingConfig:
    """No options; kept so every pass is configured the same way."""


class CanonicalizePooling(Pass):
    """ReduceMean(axes = spatial, rank 4) -> GlobalAveragePool [-> Flatten]."""

    name = "canonicalize_pooling"
    config_class = CanonicalizePoolingConfig
    config: CanonicalizePoolingConfig

    def call(self, model: ir.Model) -> PassResult:
        modified = False
        for node in list(model.graph):
            if node.op_type == "ReduceMean" and node.domain in ("", "ai.onnx") and _is_spatial_mean(node):
                _rewrite(model.graph, node)
                modified = True
        return PassResult(model, modified)


def _axes(node: ir.Node) -> list[int] | None:
    if "axes" in node.attributes:
        return list(node.attributes["axes"].as_ints())
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        tensor = ir.convenience.get_const_tensor(node.inputs[1])
        return None if tensor is None else [int(a) for a in tensor.numpy().reshape(-1)]
    return None


def _is_spatial_mean(node: ir.Node) -> bool:
    shape = node.inputs[0].shape
    if shape is None or len(shape) != 4:
        return False
    axes = _axes(node)
    return axes is not None and sorted(a % 4 for a in axes) == [2, 3]


def _rewrite(graph: ir.Graph, node: ir.Node) -> None:
    keepdims = node.attributes["keepdims"].as_int() if "keepdims" in node.attributes else 1
    pool = ir.Node("", "GlobalAveragePool", [node.inputs[0]], name=f"{node.name}_gap")
    new_nodes = [pool]
    if not keepdims:
        source = node.inputs[0]
        pool.outputs[0].dtype = source.dtype
        pool.outputs[0].shape = ir.Shape([*source.shape[:2], 1, 1])  # type: ignore[index]
        new_nodes.append(
            ir.Node("", "Flatten", [pool.outputs[0]], attributes=[ir.AttrInt64("axis", 1)], name=f"{node.name}_flatten")
        )
    ir.convenience.replace_nodes_and_values(
        graph, node, [node], new_nodes, [node.outputs[0]], [new_nodes[-1].outputs[0]]
    )
