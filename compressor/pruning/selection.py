"""Which channel classes to remove: scores, a MACs model, and the global choice under a MACs target.

Classes are scored (`l1_scores`: the L1 norm of each filter over its layer's mean,
averaged over the class), ranked globally, and removed lowest first until the
model's MACs fall to the target. Classes whose units come from the same layers
form a *group* (one layer's output channels, or a residual stream's): each group
keeps at least ``min_keep`` of its classes, and a multiple of ``round_to`` of
them, since onnxruntime's kernels run fastest on channel counts that are
multiples of 8.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from compressor.ir import constant_array as _const
from compressor.pruning.channels import ChannelGraph
from compressor.pruning.node_facts import attr as _attr


def l1_scores(analysis: ChannelGraph) -> np.ndarray:
    """Per class: the mean, over its units, of the unit's filter L1 norm divided by its layer's mean norm."""
    norms: dict[ir.Node, np.ndarray] = {}
    unit_scores = np.zeros(len(analysis.sources))
    for unit, source in enumerate(analysis.sources):
        if source.node not in norms:
            norms[source.node] = _filter_norms(source.node)
        layer = norms[source.node]
        unit_scores[unit] = layer[source.channel] / max(float(layer.mean()), 1e-12) if layer.size else 0.0
    return np.array([unit_scores[list(members)].mean() for members in analysis.classes])


def _filter_norms(node: ir.Node) -> np.ndarray:
    weight = _const(node.inputs[1]) if node.op_type in ("Conv", "Gemm", "MatMul") else None
    if weight is None:
        return np.zeros(0)
    if node.op_type == "Conv" or (node.op_type == "Gemm" and _attr(node, "transB", 0)):
        return np.abs(weight.reshape(weight.shape[0], -1)).sum(axis=1)
    return np.abs(weight).sum(axis=0)


@dataclass(frozen=True)
class _Layer:
    """One layer's MACs as a function of its kept input and output channels."""

    per_pair: int  # MACs per (kept output, kept input per group) pair: positions x kernel
    out_classes: np.ndarray | None  # class of each output channel; None: outputs not mapped
    in_classes: np.ndarray | None  # class of each input position read; None: inputs not mapped
    outputs: int
    inputs: int  # input channels per group (the weight's second axis)
    depthwise: bool


class MacsModel:
    """MACs (at batch 1) of the model's constant-weight layers after removing classes."""

    __slots__ = ("layers",)

    def __init__(self, graph: ir.Graph, analysis: ChannelGraph, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """``shapes``: static (batch 1) output shapes of the layers by value name (`metrics.layer_shapes`)."""
        self.layers: list[_Layer] = []
        for node in graph:
            layer = _layer(node, analysis, shapes)
            if layer is not None:
                self.layers.append(layer)

    def __call__(self, removed: np.ndarray) -> int:
        total = 0
        for layer in self.layers:
            outputs = layer.outputs if layer.out_classes is None else int((~removed[layer.out_classes]).sum())
            if layer.depthwise:
                total += layer.per_pair * outputs
                continue
            inputs = layer.inputs if layer.in_classes is None else int((~removed[layer.in_classes]).sum())
            total += layer.per_pair * outputs * inputs
        return total


def _layer(node: ir.Node, analysis: ChannelGraph, shapes: Mapping[str, tuple[int, ...]]) -> _Layer | None:
    if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
        return None
    weight, out = _const(node.inputs[1]), node.outputs[0]
    dims = shapes.get(out.name)
    if weight is None or dims is None:
        return None
    x, maps = node.inputs[0], analysis.maps
    out_classes = analysis.class_of(maps[out].ids) if out in maps else None
    in_classes = analysis.class_of(maps[x].ids) if x in maps else None
    if node.op_type == "Conv":
        group = _attr(node, "group", 1)
        in_classes = in_classes if group == 1 else None
        positions = math.prod(dims[2:]) * math.prod(weight.shape[2:])
        depthwise = group > 1 and weight.shape[1] == 1
        return _Layer(positions, out_classes, in_classes, weight.shape[0], weight.shape[1], depthwise)
    trans_b = node.op_type == "Gemm" and _attr(node, "transB", 0)
    outputs, inputs = (weight.shape[0], weight.shape[1]) if trans_b else (weight.shape[1], weight.shape[0])
    return _Layer(math.prod(dims[1:-1]), out_classes, in_classes, outputs, inputs, False)


def groups_of(analysis: ChannelGraph) -> list[list[int]]:
    """The prunable classes, grouped by the set of layers their units come from."""
    by_layers: dict[frozenset[str], list[int]] = defaultdict(list)
    for index in analysis.prunable:
        layers = frozenset(analysis.sources[u].node.name for u in analysis.classes[index])
        by_layers[layers].append(index)
    return list(by_layers.values())


@dataclass(frozen=True)
class Choice:
    """The classes chosen for removal and the MACs before and after."""

    removed: np.ndarray  # bool per class
    macs_before: int
    macs_after: int

    @property
    def fraction_removed(self) -> float:
        return 1.0 - self.macs_after / self.macs_before if self.macs_before else 0.0


def choose(
    analysis: ChannelGraph,
    scores: np.ndarray,
    macs: MacsModel,
    fixed_macs: int,
    fraction: float,
    round_to: int,
    min_keep: float,
) -> Choice:
    """The fewest lowest-scored classes whose removal takes ``fraction`` of the MACs (or as close as allowed).

    ``fixed_macs`` counts what pruning cannot change (layers with no constant weight). Bisects a
    global score threshold; each group then keeps its classes above it, at least ``min_keep`` of
    them, rounded up to a multiple of ``round_to``.
    """
    nothing = np.zeros(len(analysis.classes), dtype=bool)
    before = fixed_macs + macs(nothing)
    target = before * (1.0 - fraction)
    groups = [sorted(group, key=lambda c: scores[c]) for group in groups_of(analysis)]
    thresholds = np.unique(scores[analysis.prunable]) if analysis.prunable else np.zeros(0)

    def removal(count: int) -> np.ndarray:
        removed = nothing.copy()
        if count == 0:
            return removed
        cut = thresholds[count - 1]
        for group in groups:
            below = sum(scores[c] <= cut for c in group)
            kept = _rounded_kept(len(group) - below, len(group), round_to, min_keep)
            removed[group[: len(group) - kept]] = True
        return removed

    low, high = 0, len(thresholds)
    while low < high:  # the smallest threshold count that meets the target
        middle = (low + high) // 2
        if fixed_macs + macs(removal(middle)) <= target:
            high = middle
        else:
            low = middle + 1
    removed = removal(low)
    return Choice(removed, before, fixed_macs + macs(removed))


def _rounded_kept(kept: int, size: int, round_to: int, min_keep: float) -> int:
    floor = max(math.ceil(min_keep * size), min(size, round_to), 1)
    kept = max(kept, floor)
    return min(size, math.ceil(kept / round_to) * round_to)
