"""Structured channel pruning: remove whole channels until a MACs target, leaving a smaller dense ONNX graph.

The pass analyses the channel dependencies (`compressor.pruning.channels`),
scores every removable class of coupled channels (``method``), chooses the
lowest-scored ones under the MACs target (`compressor.pruning.selection`) and
removes them physically (`compressor.pruning.surgery`): weights, biases,
per-channel constants, group counts, reshape targets, split sizes and shapes.
With data, the removed channels' means go into the next layers' biases first
(`compressor.pruning.compensation`); with training data, the pruned model is
then fine-tuned, distilled from the original (`compressor.training`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import PassResult

from compressor import runtime
from compressor.errors import DataError, ModelError, UsageError
from compressor.instruments import stage
from compressor.ir import to_proto
from compressor.metrics import compute_cost, layer_shapes
from compressor.pipeline import Pass, PassContext, Tolerance
from compressor.pruning.channels import ChannelGraph, analyze
from compressor.pruning.compensation import compensate_means
from compressor.pruning.config import PruneConfig
from compressor.pruning.selection import Choice, MacsModel, choose, l1_scores
from compressor.pruning.surgery import remove_channels
from compressor.training import EpochRecord, TrainSettings, check_labels, fine_tune, first_output_classes

COMPENSATION_SAMPLES = 256  # enough for per-channel means


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
        self.compensated: list[str] = []
        self.training: list[EpochRecord] = []

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
        fine_tuning = context.train is not None and config.epochs > 0 and self.choice.removed.any()
        teacher = to_proto(model) if fine_tuning else None  # the original, before any change
        data = context.calibration or context.train
        if config.compensate and data is not None and self.choice.removed.any():
            with stage("pruning", ": compensating the removed channels' means", context):
                batches = (batch.feeds for batch in data.batches(32, limit=COMPENSATION_SAMPLES))
                self.compensated = compensate_means(model, analysis, self.choice.removed, batches)
        removed = remove_channels(model.graph, analysis, self.choice.removed)
        if teacher is not None:
            self.training = _fine_tune(model, teacher, context, config)
        return PassResult(model, removed > 0)


def _fine_tune(
    model: ir.Model, teacher: onnx.ModelProto, context: PassContext, config: PruneConfig
) -> list[EpochRecord]:
    """Fine-tune the pruned ``model`` on the context's training set, distilled from ``teacher``."""
    train = context.train
    assert train is not None
    if not train.has_labels:
        raise DataError("--train data has no labels: store the class indices as 'y' (int64) beside 'x'")
    if len(model.graph.inputs) != 1:
        raise UsageError("fine-tuning supports models with one input; drop --train (pruning still runs)")
    name = model.graph.inputs[0].name
    with stage("pruning", ": reading the training set", context):
        batches = list(train.batches(256, limit=config.train_samples))
        x = np.concatenate([b.feeds[name] for b in batches])
        y = np.concatenate([b.labels for b in batches])
        classes = first_output_classes(model)
        if classes is None:
            raise UsageError("fine-tuning needs the model's first output to be [batch, classes] logits")
        check_labels(y, classes)
        session = runtime.make_session(teacher)
        soft = np.concatenate([session.run(None, {name: x[i : i + 256]})[0] for i in range(0, len(x), 256)])
    settings = TrainSettings(config.epochs, config.lr, config.batch_size, distill=config.distill)
    with stage("fine-tuning", f" on {len(x)} samples", context, announce=False):
        return fine_tune(model, x, y, soft, settings, seed=context.seed, progress=context.progress)


def _layer_widths(analysis: ChannelGraph, removed: np.ndarray) -> list[dict[str, Any]]:
    """Per layer that makes channels: its output channels before and after."""
    widths: dict[str, list[int]] = {}
    for unit, source in enumerate(analysis.sources):
        if source.node.op_type in ("Conv", "Gemm", "MatMul"):
            counts = widths.setdefault(source.node.name, [0, 0])
            counts[0] += 1
            counts[1] += not removed[analysis.class_of(np.array(unit))]
    return [{"node": name, "channels": before, "kept": kept} for name, (before, kept) in widths.items()]
