"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization").

For a pair Conv1 -> [f] -> Conv2 where f is positively homogeneous
(f(x / s) = f(x) / s for s > 0: Relu, LeakyRelu, PRelu, a zero Pad, or
nothing), output channel i of Conv1 (weights and bias) is divided by s_i and
input channel i of Conv2 multiplied by s_i. The function is unchanged; with

    s_i = sqrt(r1_i / r2_i) = (1 / r2_i) * sqrt(r1_i * r2_i)

(r1_i = max |W1[i]|, r2_i = max |W2[:, i]|) both ranges become sqrt(r1_i r2_i),
so per-tensor quantization of either weight, and of the activation between
them, wastes fewer levels on a few wide channels. Depthwise -> pointwise
pairs (MobileNet, EfficientNet) are the key case. Chains are iterated until
the scales settle.

Clip(0, M) (ReLU6) is not scale-equivariant: clip(x / s, 0, M) * s =
clip(x, 0, M s). A channel is rescaled through it only where an interval
bound on Conv1's pre-activation proves the upper clip never binds, before or
after (bound <= M and s >= bound / M); otherwise it keeps s = 1 and the pass
says why in ``rejections``. No ReLU6 -> ReLU substitution (which changes the
function) is ever made.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import PassResult

from compressor.pipeline import Pass

HOMOGENEOUS = frozenset({"Relu", "LeakyRelu", "PRelu"})
CLIP_MARGIN = 1e-4  # relative slack on the provable clip bound, so float rounding cannot flip it


@dataclass(frozen=True)
class EqualizeCrossLayerConfig:
    """``iterations``: sweeps over all pairs at most; stop once every scale is within ``tolerance`` of 1."""

    iterations: int = 20
    tolerance: float = 1e-3
    max_chain: int = 3  # ops allowed between the two Convs


@dataclass
class _Pair:
    first: ir.Node
    between: list[ir.Node]
    second: ir.Node
    clip_max: float | None = None  # the Clip(0, M) upper bound to respect, if any
    channels: set[int] = field(default_factory=set)  # channels ever rescaled

    @property
    def label(self) -> str:
        return f"{self.first.name or 'Conv'} -> {self.second.name or 'Conv'}"


class EqualizeCrossLayer(Pass):
    """Balance per-channel weight ranges across Conv -> [Relu] -> Conv pairs; lossless in float."""

    name = "equalize_cross_layer"
    config_class = EqualizeCrossLayerConfig
    config: EqualizeCrossLayerConfig

    def __init__(self, config: EqualizeCrossLayerConfig | None = None) -> None:
        super().__init__(config)
        self.rejections: list[str] = []
        self.equalized: dict[str, int] = {}  # pair -> number of channels rescaled

    def call(self, model: ir.Model) -> PassResult:
        self.rejections, self.equalized = [], {}
        pairs = []
        for node in model.graph:
            if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
                continue
            found = self._match(node)
            if isinstance(found, _Pair):
                pairs.append(found)
            elif found is not None:
                self.rejections.append(found)
        unsafe: dict[str, str] = {}
        for _ in range(self.config.iterations):
            largest = 0.0
            for pair in pairs:
                scale, why = _scales(pair)
                if why:
                    unsafe[pair.label] = why
                if np.all(scale == 1.0):
                    continue
                _apply(pair, scale)
                pair.channels.update(np.flatnonzero(scale != 1.0).tolist())
                largest = max(largest, float(np.max(np.abs(np.log(scale)))))
            if largest <= self.config.tolerance:
                break
        self.rejections += [f"{label}: {why}" for label, why in unsafe.items()]
        self.equalized = {pair.label: len(pair.channels) for pair in pairs if pair.channels}
        return PassResult(model, bool(self.equalized))

    def _match(self, first: ir.Node) -> _Pair | str | None:
        """The pair starting at ``first``; a reason when a Conv follows but cannot be paired; None otherwise."""
        between: list[ir.Node] = []
        value = first.outputs[0]
        for _ in range(self.config.max_chain + 1):
            uses = list(value.uses())
            if len(uses) != 1 or value.is_graph_output() or uses[0].idx != 0:
                return None  # shared or side-input: not a chain
            node = uses[0].node
            if node.op_type == "Conv" and node.domain in ("", "ai.onnx"):
                return _check(_Pair(first, between, node))
            if len(node.outputs) != 1:
                return None
            between.append(node)
            value = node.outputs[0]
        return None


def _check(pair: _Pair) -> _Pair | str:
    """Every legality check; returns the pair (with its clip bound) or why it is rejected."""
    label = pair.label
    for conv in (pair.first, pair.second):
        weight = conv.inputs[1]
        if weight is None or weight.const_value is None or not weight.is_initializer():
            return f"{label}: weight of {conv.name} is not constant"
        if weight.dtype != ir.DataType.FLOAT or len(weight.const_value.shape) < 3:
            return f"{label}: weight of {conv.name} is not a float32 Conv kernel"
        if len(list(weight.uses())) != 1:
            return f"{label}: weight of {conv.name} is shared with other nodes"
    bias = pair.first.inputs[2] if len(pair.first.inputs) > 2 else None
    if bias is not None and (bias.const_value is None or not bias.is_initializer() or len(list(bias.uses())) != 1):
        return f"{label}: bias of {pair.first.name} is not a constant of its own"
    w1, w2 = (conv.inputs[1].const_value.shape for conv in (pair.first, pair.second))
    if w2[1] * _groups(pair.second) != w1[0]:
        return f"{label}: channel counts do not match"
    for node in pair.between:
        why = _homogeneity(node, pair)
        if why:
            return f"{label}: {why}"
    return pair


def _homogeneity(node: ir.Node, pair: _Pair) -> str | None:
    """Why ``node`` does not commute with per-channel positive scaling (None if it does)."""
    if node.op_type in HOMOGENEOUS and node.domain in ("", "ai.onnx"):
        return None
    if node.op_type == "Pad" and node.domain in ("", "ai.onnx"):
        return _zero_pad_issue(node)
    if node.op_type == "Clip" and node.domain in ("", "ai.onnx"):
        bounds = _clip_bounds(node)
        if bounds is None:
            return "Clip bounds are not constant"
        low, high = bounds
        if low != -np.inf and low != 0.0:
            return f"Clip min {low:g} is not scale-equivariant"
        if high != np.inf:
            if pair.clip_max is not None:
                return "more than one Clip between the Convs"
            pair.clip_max = high
        return None
    return f"{node.op_type} between the Convs is not positively homogeneous"


def _clip_bounds(node: ir.Node) -> tuple[float, float] | None:
    """A Clip's (min, max), infinite where absent, from inputs (opset >= 11) or attributes; None if not constant."""
    bounds = [-np.inf, np.inf]
    for index, name in ((1, "min"), (2, "max")):
        if name in node.attributes:
            bounds[index - 1] = node.attributes[name].as_float()
        elif len(node.inputs) > index and node.inputs[index] is not None:
            value = _const(node.inputs[index])
            if value is None:
                return None
            bounds[index - 1] = float(value)
    return bounds[0], bounds[1]


def _zero_pad_issue(node: ir.Node) -> str | None:
    """None for a constant-mode Pad with value 0 that leaves the batch and channel axes alone."""
    mode = node.attributes["mode"].as_string() if "mode" in node.attributes else "constant"
    pads = _const(node.inputs[1]) if len(node.inputs) > 1 else None
    value = _const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else np.zeros(())
    if mode != "constant" or pads is None or value is None or np.any(value != 0) or len(node.inputs) > 3:
        return "Pad is not a constant zero pad"
    rank = len(pads) // 2
    if rank < 2 or np.any(pads[[0, 1, rank, rank + 1]] != 0):
        return "Pad pads the batch or channel axis"
    return None


def _scales(pair: _Pair) -> tuple[np.ndarray, str | None]:
    """The paper's s_i, limited by a Clip's provable bound; and why channels were held at 1, if any."""
    w1, w2 = pair.first.inputs[1].const_value.numpy(), pair.second.inputs[1].const_value.numpy()
    r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1).astype(np.float64)
    r2 = _input_channel_range(w2, _groups(pair.second))
    scale = np.ones_like(r1)
    ok = (r1 > 0) & (r2 > 0)
    scale[ok] = np.sqrt(r1[ok] / r2[ok])
    if pair.clip_max is None:
        return scale, None
    limit = pair.clip_max * (1.0 - CLIP_MARGIN)
    bound = _interval(pair.first.outputs[0], {})
    if bound is None:
        why = "is not scale-equivariant and the first Conv's input is unbounded, so it may bind; not rescaled"
        return np.ones_like(scale), f"Clip(0, {pair.clip_max:g}) {why}"
    upper = np.broadcast_to(bound[1], scale.shape)
    safe = upper <= limit
    scale = np.where(safe, np.maximum(scale, upper / limit), 1.0)
    if safe.all():
        return scale, None
    bound_text = f"bound up to {float(upper.max()):.3g}"
    why = f"may bind on {int((~safe).sum())} of {len(safe)} channels ({bound_text}); those keep scale 1"
    return scale, f"Clip(0, {pair.clip_max:g}) is not scale-equivariant and {why}"


def _apply(pair: _Pair, scale: np.ndarray) -> None:
    first, second = pair.first, pair.second
    w1 = first.inputs[1].const_value.numpy().astype(np.float64)
    _set(first.inputs[1], w1 / scale.reshape(-1, *[1] * (w1.ndim - 1)))
    if len(first.inputs) > 2 and first.inputs[2] is not None:
        _set(first.inputs[2], first.inputs[2].const_value.numpy().astype(np.float64) / scale)
    w2 = second.inputs[1].const_value.numpy().astype(np.float64)
    groups = _groups(second)
    grouped = w2.reshape(groups, w2.shape[0] // groups, w2.shape[1], -1)
    grouped = grouped * scale.reshape(groups, 1, w2.shape[1], 1)
    _set(second.inputs[1], grouped.reshape(w2.shape))


def _set(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(array.astype(np.float32), name=value.name)


def _input_channel_range(weight: np.ndarray, groups: int) -> np.ndarray:
    """max |W[:, i]| per input channel i of a grouped Conv weight [C_out, C_in / groups, k...]."""
    out_channels, per_group = weight.shape[:2]
    grouped = np.abs(weight).reshape(groups, out_channels // groups, per_group, -1)
    return grouped.max(axis=(1, 3)).reshape(-1).astype(np.float64)


def _groups(conv: ir.Node) -> int:
    return conv.attributes["group"].as_int() if "group" in conv.attributes else 1


def _const(value: ir.Value | None) -> np.ndarray | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else tensor.numpy()


Interval = tuple[np.ndarray, np.ndarray]


def _interval(value: ir.Value, memo: dict[int, Interval | None]) -> Interval | None:
    """Sound per-channel (axis 1) bounds [low, high] of ``value`` over every input, or None if unbounded.

    Follows Clip, Relu, zero Pad, Conv and Add back towards the inputs; a Clip
    with both bounds finite ends the walk. Graph inputs are unbounded.
    """
    if id(value) in memo:
        return memo[id(value)]
    node = value.producer()
    result: Interval | None = None
    if node is not None and node.domain in ("", "ai.onnx"):
        op = node.op_type
        if op == "Clip" and _clip_bounds(node) is not None:
            low, high = _clip_bounds(node)
            inner = (np.array(-np.inf), np.array(np.inf))
            if not (np.isfinite(low) and np.isfinite(high)):
                inner = _interval(node.inputs[0], memo) or inner
            result = (np.clip(inner[0], low, high), np.clip(inner[1], low, high))
        elif op == "Relu":
            inner = _interval(node.inputs[0], memo)
            result = (np.maximum(inner[0], 0.0), np.maximum(inner[1], 0.0)) if inner else (np.array(0.0), np.inf)
            result = (np.asarray(result[0]), np.asarray(result[1]))
        elif op == "Pad" and _zero_pad_issue(node) is None:
            inner = _interval(node.inputs[0], memo)
            result = (np.minimum(inner[0], 0.0), np.maximum(inner[1], 0.0)) if inner else None
        elif op == "Conv":
            result = _conv_interval(node, _interval(node.inputs[0], memo))
        elif op == "Add":
            a, b = (_interval(v, memo) for v in node.inputs[:2])
            result = (a[0] + b[0], a[1] + b[1]) if a and b and np.ndim(a[0]) <= 1 and np.ndim(b[0]) <= 1 else None
    memo[id(value)] = result
    return result


def _conv_interval(conv: ir.Node, inner: Interval | None) -> Interval | None:
    weight = _const(conv.inputs[1])
    if inner is None or weight is None:
        return None
    groups, out_channels, per_group = _groups(conv), weight.shape[0], weight.shape[1]
    low, high = (np.broadcast_to(np.asarray(v, np.float64), (per_group * groups,)) for v in inner)
    pads = conv.attributes["pads"].as_ints() if "pads" in conv.attributes else []
    auto_pad = conv.attributes["auto_pad"].as_string() if "auto_pad" in conv.attributes else "NOTSET"
    if any(pads) or auto_pad not in ("NOTSET", "VALID"):
        low, high = np.minimum(low, 0.0), np.maximum(high, 0.0)  # padded taps read zeros
    group_of = np.arange(out_channels) // (out_channels // groups)
    low_in = low.reshape(groups, per_group)[group_of][..., None]  # [C_out, C_in/g, 1]
    high_in = high.reshape(groups, per_group)[group_of][..., None]
    w = weight.reshape(out_channels, per_group, -1).astype(np.float64)
    with np.errstate(invalid="ignore"):
        upper = np.where(w > 0, w * high_in, 0.0) + np.where(w < 0, w * low_in, 0.0)
        lower = np.where(w > 0, w * low_in, 0.0) + np.where(w < 0, w * high_in, 0.0)
    bias = _const(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2] is not None else np.zeros(out_channels)
    return lower.sum(axis=(1, 2)) + bias, upper.sum(axis=(1, 2)) + bias
