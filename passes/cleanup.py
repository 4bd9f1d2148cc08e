"""Remove Identity nodes, dead nodes and unused opset imports.

Identity nodes between a weight and its Conv (common in torch exports) block
onnxruntime's quantized fusions, so they go first. Built from onnx-ir's own
common passes; this pass only bundles them and reports whether any changed.
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
            steps.append(IdentityEliminationPass())
        if self.config.remove_dead_nodes:
            steps.append(RemoveUnusedNodesPass())
        steps.append(RemoveUnusedOpsetsPass())
        modified = False
        for step in steps:
            modified |= step(model).modified
        return PassResult(model, modified)
