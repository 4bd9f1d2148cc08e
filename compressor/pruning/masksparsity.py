"""MaskSparsity (Jiang et al.): pruning-aware sparse regularisation, on per-channel scales inserted into an ONNX graph.

Imported ONNX models have BatchNorm folded into the Conv, so there is no γ to regularise.
`masksparsity` works on a copy of the model in which every layer (Conv, Gemm, MatMul) making
channels of a prunable class is followed by ``Mul(out, γ)``, γ a trainable per-channel scale
that starts at 1:

1. mask phase: a short training with the task loss (cross-entropy, plus distillation when the
   teacher's logits are given) and ``penalty · sign(γ)`` added to the gradient of every γ
   (network slimming's L1 subgradient); each class is then scored by the mean, over its units,
   of ``|γ|`` over its layer's mean ``|γ|``, and the caller's ``choose_removed`` picks the mask;
2. sparse phase: from the original weights again (γ = 1), ``epochs`` of the same training with
   the stronger ``masked_penalty`` on the masked classes' γ only; the kept channels are not
   regularised, which avoids the under-fitting of plain slimming;
3. every γ is folded exactly into its layer's weight and bias, and the trained weights are
   written into the caller's model, whose graph is left as it was.

The caller then removes the masked classes (`compressor.pruning.surgery.remove_channels`) and
fine-tunes. The γ train with their own (larger) Adam learning rate ``gamma_lr``: Adam moves a
parameter by about its learning rate per step whatever the gradient's size, so at the weights'
rate a few hundred steps could not shrink a scale noticeably.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F
from tqdm import tqdm

from compressor.errors import ModelError, UsageError
from compressor.ir import UniqueNames, add_initializer, to_proto
from compressor.pruning.channels import ChannelGraph
from compressor.pruning.node_facts import attr as _attr
from compressor.torch_bridge import TorchBridge

__all__ = ["MaskSparsityResult", "MaskSparsitySettings", "masksparsity"]

LAYERS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class MaskSparsitySettings:
    """How `masksparsity` trains: epochs per phase, Adam's learning rates, the two L1 penalties, distillation."""

    mask_epochs: int = 1  # global sparse training that finds the mask
    epochs: int = 2  # sparse training of the masked channels only, from the original weights
    lr: float = 1e-3  # Adam's learning rate of the model's weights
    batch_size: int = 64
    penalty: float = 5e-4  # s: the L1 subgradient on every γ in the mask phase
    masked_penalty: float = 5e-2  # on the masked channels' γ in the sparse phase
    distill: float = 1.0  # weight of the distillation term (0: labels only)
    temperature: float = 4.0
    gamma_lr: float = 5e-2  # Adam's (peak) learning rate of the γ scales

    def __post_init__(self) -> None:
        if self.mask_epochs < 0 or self.epochs < 0 or self.batch_size < 1:
            raise UsageError("masksparsity needs mask_epochs >= 0, epochs >= 0 and batch_size >= 1")
        if min(self.lr, self.gamma_lr, self.penalty, self.masked_penalty, self.distill) < 0 or self.temperature <= 0:
            raise UsageError("masksparsity's learning rates, penalties and distill must be >= 0, temperature > 0")


@dataclass(frozen=True)
class MaskSparsityResult:
    """The removal mask (bool per class) and what the two phases did."""

    removed: np.ndarray
    gamma_masked_mean: float  # mean |γ| of the masked classes' units after the sparse phase
    gamma_kept_mean: float  # mean |γ| of the other prunable classes' units
    mask_epochs: int
    epochs: int
    scales: int  # layers given a γ
    mask_losses: list[float] = field(default_factory=list)  # mean training loss per epoch
    sparse_losses: list[float] = field(default_factory=list)
    mask_seconds: float = 0.0
    sparse_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary for a report."""
        return {
            "removed_classes": int(self.removed.sum()),
            "classes": int(self.removed.size),
            "gamma_masked_mean": round(self.gamma_masked_mean, 5),
            "gamma_kept_mean": round(self.gamma_kept_mean, 5),
            "mask_epochs": self.mask_epochs,
            "epochs": self.epochs,
            "scales": self.scales,
            "mask_losses": [round(v, 5) for v in self.mask_losses],
            "sparse_losses": [round(v, 5) for v in self.sparse_losses],
            "mask_seconds": round(self.mask_seconds, 2),
            "sparse_seconds": round(self.sparse_seconds, 2),
        }


@dataclass(frozen=True)
class _Layer:
    """One scaled layer: its weight and bias initializers, the axis of the weight its outputs are on, and γ."""

    weight: str
    bias: str | None
    axis: int  # output-channel axis of the weight
    gamma: str
    channels: int


class _Scaled:
    """A copy of ``model`` with a ``Mul(out, γ)`` after every layer making channels of a prunable class."""

    def __init__(self, model: ir.Model, analysis: ChannelGraph) -> None:
        self.model = ir.serde.deserialize_model(to_proto(model))
        copies = dict(zip(model.graph, self.model.graph, strict=True))  # the proto keeps the node order
        self.layers: dict[ir.Node, _Layer] = {}  # by the caller's node
        names = UniqueNames(self.model.graph)
        for index in analysis.prunable:
            for unit in analysis.classes[index]:
                node = analysis.sources[unit].node
                if node not in self.layers and node.op_type in LAYERS:
                    if copies[node].op_type != node.op_type:
                        raise ModelError("masksparsity: the model's copy lost its node order")
                    self.layers[node] = self._insert(copies[node], names)

    def _insert(self, node: ir.Node, names: UniqueNames) -> _Layer:
        weight = node.inputs[1]
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        for value in (weight, bias):
            if value is not None and (not value.is_initializer() or len(value.uses()) != 1):
                raise ModelError(f"masksparsity needs {node.name!r}'s weight and bias to be its own initializers")
        array = weight.const_value.numpy()
        if array.dtype.kind != "f":
            raise ModelError(f"masksparsity needs float weights; {node.name!r}'s are {array.dtype}")
        if node.op_type == "Conv":
            axis, shape = 0, (array.shape[0],) + (1,) * (array.ndim - 2)
        else:
            axis = 0 if node.op_type == "Gemm" and _attr(node, "transB", 0) else 1
            shape = (array.shape[axis],)
        gamma = add_initializer(self.model.graph, f"{node.name or weight.name}_gamma", np.ones(shape, array.dtype),
                                names)  # fmt: skip
        out = node.outputs[0]
        uses = list(out.uses())
        scaled = ir.Value(name=names.fresh(f"{out.name}_scaled"), shape=out.shape, type=out.type)
        mul = ir.Node("", "Mul", [out, gamma], outputs=[scaled], name=names.fresh(f"{node.name}_gamma_mul"))
        self.model.graph.insert_after(node, mul)
        for user, position in uses:
            user.replace_input_with(position, scaled)
        if out.is_graph_output():  # the analysis blocks such channels; kept correct all the same
            outputs = self.model.graph.outputs
            outputs[next(i for i, v in enumerate(outputs) if v is out)] = scaled
            name, out.name = out.name, names.fresh(f"{out.name}_unscaled")
            scaled.name = name
        return _Layer(weight.name, bias.name if bias is not None else None, axis, gamma.name, shape[0])

    def bridge(self) -> TorchBridge:
        """A fresh torch bridge of the copy, from its original weights (γ = 1)."""
        return TorchBridge(self.model)

    def gammas(self, bridge: TorchBridge) -> dict[ir.Node, torch.nn.Parameter]:
        """Each scaled layer's γ in ``bridge``, by the caller's node."""
        return {node: bridge.parameter_for(layer.gamma) for node, layer in self.layers.items()}

    def fold_into(self, bridge: TorchBridge, target: ir.Model) -> None:
        """Write ``bridge``'s trained weights into ``target`` (the caller's model), every γ folded into its layer."""
        trained = {}
        for name in self.model.graph.initializers:
            try:
                trained[name] = bridge.parameter_for(name).detach().cpu().double().numpy()
            except KeyError:  # not a float initializer
                continue
        for layer in self.layers.values():
            gamma = trained[layer.gamma].reshape(-1)
            weight = trained[layer.weight]
            shape = [1] * weight.ndim
            shape[layer.axis] = layer.channels
            trained[layer.weight] = weight * gamma.reshape(shape)
            if layer.bias is not None:
                trained[layer.bias] = trained[layer.bias] * gamma  # a Gemm's C broadcasts on its last axis
        for name, value in target.graph.initializers.items():
            if name not in trained or value.const_value is None:
                continue
            old = value.const_value.numpy()
            new = trained[name].astype(old.dtype)
            if new.shape != old.shape and new.size == old.size:
                new = new.reshape(old.shape)
            if not np.array_equal(old, new):
                value.const_value = ir.Tensor(new, name=name)
                value.shape = ir.Shape(new.shape)


def masksparsity(
    model: ir.Model,
    analysis: ChannelGraph,
    x: np.ndarray,
    y: np.ndarray,
    teacher: np.ndarray | None,
    choose_removed: Callable[[np.ndarray], np.ndarray],
    settings: MaskSparsitySettings | None = None,
    seed: int = 0,
    progress: bool = False,
) -> MaskSparsityResult:
    """Train ``model`` in place with MaskSparsity and return the classes to remove (``removed``, bool per class).

    ``analysis`` is of ``model``'s graph; ``x``, ``y``: inputs and class indices; ``teacher``: the
    original model's logits on ``x`` (or None); ``choose_removed(scores)``: the removal mask for
    per-class scores (lower: less important), for example `compressor.pruning.selection.choose`
    under a MACs target. Only the weights change: the graph keeps its nodes, and no channel is
    removed here.
    """
    settings = settings or MaskSparsitySettings()
    if len(x) != len(y) or len(x) == 0:
        raise UsageError(f"masksparsity needs as many labels as inputs, and some: got {len(x)} and {len(y)}")
    if not analysis.prunable:
        raise ModelError("masksparsity: nothing in this model can be pruned")
    scaled = _Scaled(model, analysis)
    data = _Data(x, y, teacher, settings)

    start = time.perf_counter()
    bridge = scaled.bridge()
    gammas = scaled.gammas(bridge)
    every = [(g, torch.full_like(g, settings.penalty)) for g in gammas.values()]
    mask_losses = _train(bridge, data, settings.mask_epochs, every, seed, progress, "mask phase")
    scores = _scores(analysis, {node: g.detach().abs().reshape(-1).double().numpy() for node, g in gammas.items()})
    removed = np.asarray(choose_removed(scores), dtype=bool)
    if removed.shape != (len(analysis.classes),):
        raise UsageError(f"choose_removed must return one bool per class ({len(analysis.classes)}), "
                         f"got shape {removed.shape}")  # fmt: skip
    mask_seconds = time.perf_counter() - start

    start = time.perf_counter()
    bridge = scaled.bridge()  # from the original weights, γ = 1
    gammas = scaled.gammas(bridge)
    masked = _unit_masks(analysis, scaled, removed)
    penalties = [(g, torch.from_numpy(masked[n]).to(g.dtype).reshape(g.shape) * settings.masked_penalty)
                 for n, g in gammas.items()]  # fmt: skip
    sparse_losses = _train(bridge, data, settings.epochs, penalties, seed + 1, progress, "sparse phase")
    sparse_seconds = time.perf_counter() - start

    values = {n: g.detach().abs().reshape(-1).double().numpy() for n, g in gammas.items()}
    prunable = _unit_masks(analysis, scaled, np.isin(np.arange(len(analysis.classes)), analysis.prunable))
    on = np.concatenate([values[n][masked[n]] for n in values])
    off = np.concatenate([values[n][prunable[n] & ~masked[n]] for n in values])
    scaled.fold_into(bridge, model)
    return MaskSparsityResult(
        removed=removed,
        gamma_masked_mean=float(on.mean()) if on.size else float("nan"),
        gamma_kept_mean=float(off.mean()) if off.size else float("nan"),
        mask_epochs=settings.mask_epochs,
        epochs=settings.epochs,
        scales=len(scaled.layers),
        mask_losses=mask_losses,
        sparse_losses=sparse_losses,
        mask_seconds=mask_seconds,
        sparse_seconds=sparse_seconds,
    )


def _scores(analysis: ChannelGraph, gammas: dict[ir.Node, np.ndarray]) -> np.ndarray:
    """Per class: the mean over its units of |γ| over its layer's mean |γ| (inf for units with no γ)."""
    unit_scores = np.full(len(analysis.sources), np.inf)
    for unit, source in enumerate(analysis.sources):
        layer = gammas.get(source.node)
        if layer is not None:
            unit_scores[unit] = layer[source.channel] / max(float(layer.mean()), 1e-12)
    return np.array([unit_scores[list(members)].mean() for members in analysis.classes])


def _unit_masks(analysis: ChannelGraph, scaled: _Scaled, classes: np.ndarray) -> dict[ir.Node, np.ndarray]:
    """Per scaled layer: whether each of its output channels is a unit of a class set in ``classes``."""
    masks = {node: np.zeros(layer.channels, dtype=bool) for node, layer in scaled.layers.items()}
    for unit, source in enumerate(analysis.sources):
        if source.node in masks and classes[analysis.class_of(np.array(unit))]:
            masks[source.node][source.channel] = True
    return masks


class _Data:
    """The training set as tensors, with the task loss."""

    def __init__(
        self, x: np.ndarray, y: np.ndarray, teacher: np.ndarray | None, settings: MaskSparsitySettings
    ) -> None:
        self.inputs = torch.from_numpy(np.ascontiguousarray(x))
        self.labels = torch.from_numpy(np.asarray(y).astype(np.int64))
        self.soft = torch.from_numpy(np.ascontiguousarray(teacher)) if teacher is not None else None
        self.settings = settings

    def loss(self, logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on the labels plus, with a teacher, ``distill · T² · KL`` to its softened logits."""
        loss = F.cross_entropy(logits, self.labels[batch])
        if self.soft is not None and self.settings.distill:
            t = self.settings.temperature
            target = F.log_softmax(self.soft[batch] / t, dim=1)
            kl = F.kl_div(F.log_softmax(logits / t, dim=1), target, log_target=True, reduction="batchmean")
            loss = loss + self.settings.distill * t * t * kl
        return loss


def _train(
    bridge: TorchBridge,
    data: _Data,
    epochs: int,
    penalties: list[tuple[torch.nn.Parameter, torch.Tensor]],
    seed: int,
    progress: bool,
    phase: str,
) -> list[float]:
    """Adam on the bridge's parameters with ``coefficient · sign(γ)`` added to each γ's gradient; loss per epoch."""
    settings = data.settings
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    scales = {id(g) for g, _ in penalties}
    weights = [p for p in bridge.parameters() if p.requires_grad and id(p) not in scales]
    groups = [{"params": weights, "lr": settings.lr}, {"params": [g for g, _ in penalties], "lr": settings.gamma_lr}]
    optimizer = torch.optim.Adam([g for g in groups if g["params"]])
    steps = epochs * -(-len(data.inputs) // settings.batch_size)
    rates = [group["lr"] for group in optimizer.param_groups]  # warm-up then anneal, as `fine_tune`
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, rates, total_steps=steps) if steps else None
    losses = []
    bridge.train()
    for epoch in range(1, epochs + 1):
        batches = torch.randperm(len(data.inputs), generator=generator).split(settings.batch_size)
        total = []
        for batch in tqdm(batches, desc=f"masksparsity {phase}, epoch {epoch}/{epochs}", disable=not progress,
                          leave=False, unit="batch"):  # fmt: skip
            loss = data.loss(bridge(data.inputs[batch])[0], batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                for gamma, coefficient in penalties:
                    if gamma.grad is not None:
                        gamma.grad.add_(coefficient * torch.sign(gamma))
            optimizer.step()
            if schedule is not None:
                schedule.step()
            total.append(float(loss.detach()))
        losses.append(float(np.mean(total)))
    return losses
