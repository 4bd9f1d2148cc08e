"""Structured channel pruning: remove whole channels until a MACs target, leaving a smaller dense ONNX graph.

The pass analyses the channel dependencies (`compressor.pruning.channels`),
scores every removable class of coupled channels (``method``), chooses the
lowest-scored ones under the MACs target (`compressor.pruning.selection`) and
removes them physically (`compressor.pruning.surgery`): weights, biases,
per-channel constants, group counts, reshape targets, split sizes and shapes.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import PassResult

from compressor.errors import ModelError
from compressor.metrics import compute_cost, layer_shapes
from compressor.pipeline import Pass, PassContext, Tolerance
from compressor.pruning.channels import ChannelGraph, analyze
from compressor.pruning.config import PruneConfig
from compressor.pruning.selection import Choice, MacsModel, choose, l1_scores
from compressor.pruning.surgery import remove_channels


class PruneChannels(Pass):
    """Remove ``config.fraction`` of the MACs as whole channels, lowest-scored first."""

    name = "prune_channels"
    config_class = PruneConfig
    config: PruneConfig
    # Without fine-tuning the outputs may move by any amount: the report gives the fidelity.
    tolerance = Tolerance(max_relative_error=None, min_sqnr_db=float("-inf"))

    def __init__(self, config: PruneConfig | None = None) -> None:
        super().__init__(config)
        self.choice: Choice | None = None
        self.layers: list[dict[str, Any]] = []
        self.blocked: dict[str, int] = {}

    def call(self, model: ir.Model) -> PassResult:
        context = PassContext.current()
        analysis = analyze(model.graph)
        self.blocked = dict(Counter(analysis.blocked.values()).most_common())
        if not analysis.prunable:
            first = next(iter(self.blocked), "it has no Conv, Gemm or MatMul with a constant weight")
            raise ModelError(f"nothing in this model can be pruned: {first}")
        scores = l1_scores(analysis)
        cost = MacsModel(model.graph, analysis, layer_shapes(model, context.input_shapes))
        nothing = np.zeros(len(analysis.classes), dtype=bool)
        fixed = max(compute_cost(model, context.input_shapes).macs - cost(nothing), 0)
        config = self.config
        self.choice = choose(analysis, scores, cost, fixed, config.fraction, config.round_to, config.min_keep)
        self.layers = _layer_widths(analysis, self.choice.removed)
        removed = remove_channels(model.graph, analysis, self.choice.removed)
        return PassResult(model, removed > 0)


def _layer_widths(analysis: ChannelGraph, removed: np.ndarray) -> list[dict[str, Any]]:
    """Per layer that makes channels: its output channels before and after."""
    widths: dict[str, list[int]] = {}
    for unit, source in enumerate(analysis.sources):
        if source.node.op_type in ("Conv", "Gemm", "MatMul"):
            counts = widths.setdefault(source.node.name, [0, 0])
            counts[0] += 1
            counts[1] += not removed[analysis.class_of(np.array(unit))]
    return [{"node": name, "channels": before, "kept": kept} for name, (before, kept) in widths.items()]
