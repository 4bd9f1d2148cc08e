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
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import PassResult

from compressor.errors import DataError, MissingContextError, ModelError, UsageError
from compressor.instruments import stage
from compressor.ir import to_proto
from compressor.metrics import compute_cost, layer_shapes
from compressor.pipeline import Pass, PassContext, Tolerance
from compressor.pruning.channels import ChannelGraph, analyze
from compressor.pruning.compensation import compensate_means
from compressor.pruning.config import PruneConfig
from compressor.pruning.selection import Choice, MacsModel, choose, l1_scores
from compressor.pruning.surgery import remove_channels

if TYPE_CHECKING:
    from compressor.training import EpochRecord

# LRP, MaskSparsity and fine-tuning run on torch, imported only when they run: importing torch costs
# about 190 MB of RSS and a second, and the int8 path (which imports this module) never needs it.

COMPENSATION_SAMPLES = 256  # enough for per-channel means
LAYERS = ("Conv", "Gemm", "MatMul")


class PruneChannels(Pass):
    """Remove ``config.fraction`` of the MACs as whole channels, lowest-scored first."""

    name = "prune_channels"
    config_class = PruneConfig
    config: PruneConfig
    # Without fine-tuning the outputs may move by any amount: the report gives the fidelity.
    tolerance = Tolerance(max_relative_error=None, min_sqnr_db=float("-inf"))

    def __init__(self, config: PruneConfig | None = None) -> None:
        super().__init__(config)
        self.choices: list[Choice] = []  # one per step
        self.layers: list[dict[str, Any]] = []
        self.blocked: dict[str, int] = {}
        self.compensated: list[str] = []
        self.training: list[EpochRecord] = []
        self.sparsity: dict[str, Any] = {}  # MaskSparsity's record

    @property
    def choice(self) -> Choice | None:
        """The whole run: the last step's removal, the MACs before the first and after the last step."""
        if not self.choices:
            return None
        first, last = self.choices[0], self.choices[-1]
        return Choice(last.removed, first.macs_before, last.macs_after)

    def call(self, model: ir.Model) -> PassResult:
        context, config = PassContext.current(), self.config
        self.choices, self.compensated, self.training = [], [], []
        before = _widths(model.graph)
        trains = config.epochs > 0 or config.method == "masksparsity"
        teacher = to_proto(model) if context.train is not None and trains else None  # the original
        steps = 1 if config.method == "masksparsity" else config.steps
        changed = False
        for step in range(1, steps + 1):
            analysis = analyze(model.graph)
            if step == 1:
                self.blocked = dict(Counter(analysis.blocked.values()).most_common())
                if not analysis.prunable:
                    first = next(iter(self.blocked), "it has no Conv, Gemm or MatMul with a constant weight")
                    raise ModelError(f"nothing in this model can be pruned: {first}")
            cost = MacsModel(model.graph, analysis, layer_shapes(model, context.input_shapes))
            nothing = np.zeros(len(analysis.classes), dtype=bool)
            fixed = max(compute_cost(model, context.input_shapes).macs - cost(nothing), 0)
            current = fixed + cost(nothing)
            original = self.choices[0].macs_before if self.choices else current
            wanted = config.fraction * step / steps  # of the original MACs, by the end of this step
            fraction = max(0.0, 1.0 - (1.0 - wanted) * original / current)
            removal = partial(_lowest, analysis, cost, fixed, fraction, config)
            removed = self._removal(model, analysis, removal, teacher, context)
            self.choices.append(Choice(removed, current, fixed + cost(removed)))
            if not removed.any():
                break
            changed = self._remove(model, analysis, removed, context) or changed
        self.layers = _width_changes(before, _widths(model.graph))
        if teacher is not None and config.epochs and changed:
            self.training = _fine_tune(model, teacher, context, config)
        return PassResult(model, changed)

    def _removal(
        self,
        model: ir.Model,
        analysis: ChannelGraph,
        removal: Callable[[np.ndarray], np.ndarray],
        teacher: onnx.ModelProto | None,
        context: PassContext,
    ) -> np.ndarray:
        """The classes to remove: the lowest-scored by ``method`` under the MACs target."""
        method = self.config.method
        if method == "l1":
            return removal(l1_scores(analysis))
        name = model.graph.inputs[0].name
        from compressor.training import read_arrays

        if method == "lrp":
            from compressor.pruning.lrp import lrp_scores

            data = context.train if context.train is not None else context.calibration
            if data is None:
                raise MissingContextError("LRP pruning needs reference data: pass --calib DATA.npz or --train DATA.npz")
            x, y = read_arrays(data, name, self.config.lrp_samples)
            with stage("pruning", f": LRP relevance on {len(x)} samples", context):
                return removal(lrp_scores(model, analysis, x, y))
        if context.train is None or teacher is None:
            raise MissingContextError("MaskSparsity trains the model: pass --train DATA.npz (with labels 'y')")
        from compressor.pruning.masksparsity import MaskSparsitySettings, masksparsity

        x, y, soft = _training_arrays(model, teacher, context, self.config)
        settings = MaskSparsitySettings(
            mask_epochs=1, epochs=self.config.sparse_epochs, lr=self.config.lr, batch_size=self.config.batch_size,
            distill=self.config.distill,
        )  # fmt: skip
        with stage("pruning", ": MaskSparsity (mask, then sparse training)", context, announce=False):
            result = masksparsity(model, analysis, x, y, soft, removal, settings, context.seed, context.progress)
        self.sparsity = result.as_dict()
        return result.removed

    def _remove(self, model: ir.Model, analysis: ChannelGraph, removed: np.ndarray, context: PassContext) -> bool:
        data = context.calibration or context.train
        if self.config.compensate and data is not None:
            with stage("pruning", ": compensating the removed channels' means", context):
                batches = (batch.feeds for batch in data.batches(32, limit=COMPENSATION_SAMPLES))
                self.compensated += compensate_means(model, analysis, removed, batches)
        return remove_channels(model.graph, analysis, removed) > 0


def _lowest(
    analysis: ChannelGraph, cost: MacsModel, fixed: int, fraction: float, config: PruneConfig, scores: np.ndarray
) -> np.ndarray:
    """The lowest-``scores`` classes whose removal takes ``fraction`` of the MACs (`choose`)."""
    return choose(analysis, scores, cost, fixed, fraction, config.round_to, config.min_keep).removed


def _training_arrays(
    model: ir.Model, teacher: onnx.ModelProto, context: PassContext, config: PruneConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The training set as arrays (inputs, labels) and the original model's logits on it, checked."""
    from compressor.training import check_labels, first_output_classes, model_logits, read_arrays

    train = context.train
    assert train is not None
    if not train.has_labels:
        raise DataError("--train data has no labels: store the class indices as 'y' (int64) beside 'x'")
    if len(model.graph.inputs) != 1:
        raise UsageError("training supports models with one input; drop --train (pruning still runs)")
    name = model.graph.inputs[0].name
    classes = first_output_classes(model)
    if classes is None:
        raise UsageError("training needs the model's first output to be [batch, classes] logits")
    with stage("pruning", ": reading the training set", context):
        x, y = read_arrays(train, name, config.train_samples)
        assert y is not None
        check_labels(y, classes)
        return x, y, model_logits(teacher, name, x)


def _fine_tune(
    model: ir.Model, teacher: onnx.ModelProto, context: PassContext, config: PruneConfig
) -> list[EpochRecord]:
    """Fine-tune the pruned ``model`` on the context's training set, distilled from ``teacher``."""
    from compressor.training import TrainSettings, fine_tune

    x, y, soft = _training_arrays(model, teacher, context, config)
    settings = TrainSettings(config.epochs, config.lr, config.batch_size, distill=config.distill)
    with stage("fine-tuning", f" on {len(x)} samples", context, announce=False):
        return fine_tune(model, x, y, soft, settings, seed=context.seed, progress=context.progress)


def _widths(graph: ir.Graph) -> dict[str, int]:
    """Output channels of every Conv, Gemm and MatMul with a constant weight, by node name."""
    widths = {}
    for node in graph:
        weight = node.inputs[1].const_value if node.op_type in LAYERS and len(node.inputs) > 1 else None
        if weight is None or len(weight.shape) < 2:
            continue
        trans_b = node.op_type == "Gemm" and "transB" in node.attributes and node.attributes["transB"].as_int()
        widths[node.name] = weight.shape[0 if node.op_type == "Conv" or trans_b else 1]
    return widths


def _width_changes(before: dict[str, int], after: dict[str, int]) -> list[dict[str, Any]]:
    return [{"node": name, "channels": width, "kept": after.get(name, width)} for name, width in before.items()]
