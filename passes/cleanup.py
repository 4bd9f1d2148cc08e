"""Remove Identity nodes, dead nodes and unused opset imports.

Identity nodes between a weight and its Conv (common in torch exports) block
onnxruntime's quantized fusions, so they go first. Built from onnx-ir's own
common passes; this pass only bundles them and reports whether any changed.

onnx-ir's Identity elimination makes the Identity's input the graph output in
its place. In a subgraph (an If or Loop body) whose output is an Identity of a
value from the enclosing graph, that would make one value the output of two
graphs, which onnx-ir refuses: such Identity nodes are kept, as ONNX requires.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
from onnx_ir.passes import PassResult
from onnx_ir.passes.common import (
    IdentityEliminationPass,
    RemoveUnusedNodesPass,
    RemoveUnusedOpsetsPass,
)

from compressor.pipeline import Pass


@dataclass(frozen=True)
class CleanupConfig:
    """Which clean-ups to run."""

    remove_identity: bool = True
    remove_dead_nodes: bool = True


class Cleanup(Pass):
    """Eliminate Identity and unused nodes (lossless)."""

    name = "cleanup"
    config_class = CleanupConfig
    config: CleanupConfig

    def call(self, model: ir.Model) -> PassResult:
        steps: list[ir.passes.PassBase] = []
        if self.config.remove_identity:
            steps.append(_SameGraphIdentityElimination())
        if self.config.remove_dead_nodes:
            steps.append(RemoveUnusedNodesPass())
        steps.append(RemoveUnusedOpsetsPass())
        modified = False
        for step in steps:
            modified |= step(model).modified
        return PassResult(model, modified)


class _SameGraphIdentityElimination(IdentityEliminationPass):
    """onnx-ir's Identity elimination, keeping the graph outputs it cannot take over (see the module doc)."""

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        output = node.outputs[0] if len(node.outputs) == 1 else None
        source = node.inputs[0] if len(node.inputs) == 1 else None
        if output is not None and source is not None and output.is_graph_output():
            producer = source.producer()
            owner = producer.graph if producer is not None else source.graph
            if owner is not node.graph or source.is_graph_output():
                return False
        return super()._try_eliminate_identity_node(node)
