"""LRP relevance scores for structured pruning ("Pruning by Explaining", Yeom et al. 2021).

Relevance starts at the first output (``[N, classes]`` logits) as a one-hot of each
sample's class (its label, else its predicted class), normalised so every sample
brings a total relevance of 1, and flows back through the graph node by node in
reverse order. The forward values come from `compressor.torch_bridge.TorchBridge`
(its plan and value slots); single nodes are re-run with their `compressor.torch_ops`
handler where a rule needs gradients. The rules, with ``eps`` the stabiliser
(``z + eps * sign(z)`` in every denominator) and biases always ignored:

- the *first* layer (a Conv, ConvTranspose, Gemm or MatMul with a constant weight
  reading a graph input directly): the z^B (bounded) rule, with the bounds ``l`` and
  ``h`` the minimum and maximum of that input over the reference data (per tensor);
- other Conv / ConvTranspose layers: z+ (alpha 1, beta 0) in its general form,
  ``z+ = W+ x+ + W- x-``, so it stays valid for inputs that can be negative;
- other Gemm / MatMul layers (and a Conv/Gemm/MatMul whose one data input is not
  its first): the epsilon rule;
- linear or piecewise-linear ops that move or combine values (pooling, reductions,
  Reshape/Flatten/Transpose/Slice/Gather/Concat/Split/Pad/..., and Add/Sub/Sum/Mean/
  Max/Min/Where of several data inputs, the residual sums): the epsilon rule as
  gradient x input, ``R_in = x * grad_x(z * stopgrad(R_out / z))``; for an Add it
  splits ``R`` in proportion to each input's contribution;
- any other op with one data input of the output's shape (Relu, Clip,
  BatchNormalization, Add/Mul of a constant, Sigmoid, Softmax, ...): pass-through;
- Mul/Div of two data inputs (a gate): all of ``R`` goes to the input of the output's shape;
- anything else: `LrpUnsupportedError` naming the op and the node.

A channel's score is ``sum |R|`` over the batch and the other axes of its layer's
output, summed over the reference batches, divided by its layer's mean, and a class's
score is the mean over its units (as `compressor.pruning.selection.l1_scores`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import reduce

import numpy as np
import onnx_ir as ir
import torch

from compressor.errors import DataError, ModelError
from compressor.pruning.channels import ChannelGraph
from compressor.torch_bridge import TorchBridge
from compressor.torch_ops import Call, Handler

__all__ = ["LrpUnsupportedError", "lrp_relevance", "lrp_scores"]

Tensor = torch.Tensor
LAYERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# Linear or piecewise-linear ops that route values: gradient x input (epsilon rule), whatever their shapes.
ROUTED = frozenset(
    {
        "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceSum", "ReduceMax",
        "ReduceMin", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Split", "Slice",
        "Gather", "GatherElements", "Pad", "Expand", "Tile", "Resize", "DepthToSpace", "SpaceToDepth",
    }
)  # fmt: skip
SUMS = frozenset({"Add", "Sub", "Sum", "Mean", "Max", "Min", "Where"})  # several data inputs: epsilon rule
GATES = frozenset({"Mul", "Div"})  # two data inputs: R goes to the signal (the input of the output's shape)


class LrpUnsupportedError(ModelError):
    """The model holds an op no LRP rule covers (it changes the shape and is not known to be linear)."""


@dataclass(frozen=True)
class _Step:
    """One node of the bridge's plan, with what the backward pass needs to know of it."""

    handler: Handler
    call: Call
    ins: list[int]  # value slots, -1 for an omitted input
    outs: list[int]
    name: str
    live: list[int]  # positions of the inputs that depend on a graph input
    constant_weight: bool  # input 1 is an initializer or a Constant
    first: bool  # input 0 is a graph input


def _stabilised(z: Tensor, eps: float) -> Tensor:
    return torch.where(z >= 0, z + eps, z - eps)


def _gradient_x_input(
    fn: Callable[..., Tensor | tuple[Tensor, ...]], leaves: list[Tensor], routs: list[Tensor | None], eps: float
) -> list[Tensor]:
    """``leaf * grad_leaf(sum_k z_k * stopgrad(R_k / z_k))`` for ``z = fn(*leaves)``: the epsilon rule."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in leaves]
        outs = fn(*leaves)
        outs = (outs,) if isinstance(outs, Tensor) else tuple(outs)
        pairs = [(z, r / _stabilised(z.detach(), eps)) for z, r in zip(outs, routs, strict=False) if r is not None]
        grads = torch.autograd.grad([z for z, _ in pairs], leaves, [s for _, s in pairs], allow_unused=True)
    return [t.detach() * g if g is not None else torch.zeros_like(t) for t, g in zip(leaves, grads, strict=True)]


class _Propagator:
    """Forward values through the torch bridge, relevance back through the rules."""

    def __init__(self, model: ir.Model, epsilon: float) -> None:
        bridge = TorchBridge(model, trainable=lambda _: False)
        self.bridge, self.eps = bridge, epsilon
        constants = {slot for slot, _ in bridge._param_slots} | {slot for slot, _ in bridge._buffer_slots}
        inputs = set(bridge._input_slots)
        live = set(inputs)
        self.steps: list[_Step] = []
        for handler, call, ins, outs, name in bridge._plan:
            positions = [p for p, slot in enumerate(ins) if slot in live]
            if positions:
                live.update(outs)
            weight = len(ins) > 1 and ins[1] in constants
            self.steps.append(_Step(handler, call, ins, outs, name, positions, weight, ins[0] in inputs))
        if not bridge._output_slots:
            raise ModelError("the model has no outputs to explain")
        self.bounds = (0.0, 1.0)  # of the graph input, for the first layers' z^B rule

    def slot(self, value: ir.Value) -> int:
        return self.bridge._slots[value]

    def forward(self, x: Tensor) -> list[Tensor | None]:
        """Every value slot's tensor for the batch ``x`` (the bridge's forward, keeping all values)."""
        bridge = self.bridge
        env: list[Tensor | None] = [None] * len(bridge._slots)
        for slot, index in bridge._param_slots:
            env[slot] = bridge.params[index].detach()
        for slot, buffer in bridge._buffer_slots:
            env[slot] = bridge._buffers[buffer]
        env[bridge._input_slots[0]] = x
        for step in self.steps:
            result = step.handler([None if i < 0 else env[i] for i in step.ins], step.call)
            results = (result,) if isinstance(result, Tensor) else tuple(result)
            for slot, tensor in zip(step.outs, results, strict=False):
                env[slot] = tensor
        return env

    def relevance(self, x: Tensor, y: np.ndarray | None, keep: Collection[int] | None) -> dict[int, Tensor]:
        """The relevance of the slots in ``keep`` (all when None) for the batch ``x`` explained at classes ``y``."""
        with torch.no_grad():
            env = self.forward(x)
            out_slot = self.bridge._output_slots[0]
            logits = env[out_slot]
            if logits is None or logits.dim() != 2:
                shape = None if logits is None else tuple(logits.shape)
                raise ModelError(f"LRP needs the first output to be [batch, classes] logits, got shape {shape}")
            labels = logits.argmax(1) if y is None else torch.as_tensor(np.asarray(y), dtype=torch.int64)
            if labels.shape != (logits.shape[0],) or labels.min() < 0 or labels.max() >= logits.shape[1]:
                raise DataError(f"labels must be {logits.shape[0]} class indices in [0, {logits.shape[1]})")
            start = torch.zeros_like(logits)
            start[torch.arange(len(labels)), labels] = 1.0  # the class logit over itself: 1 per sample
            relevance: dict[int, Tensor] = {out_slot: start}
            kept: dict[int, Tensor] = {}
            for step in reversed(self.steps):
                routs = [relevance.pop(s, None) for s in step.outs]
                for slot, r in zip(step.outs, routs, strict=True):
                    if r is not None and (keep is None or slot in keep):
                        kept[slot] = r
                if all(r is None for r in routs):
                    continue
                for position, r in self._backward(step, env, routs).items():
                    slot = step.ins[position]
                    relevance[slot] = relevance[slot] + r if slot in relevance else r
            for slot, r in relevance.items():  # the graph inputs
                if keep is None or slot in keep:
                    kept[slot] = r
        return kept

    def _backward(self, step: _Step, env: list[Tensor | None], routs: list[Tensor | None]) -> dict[int, Tensor]:
        """The relevance of the node's data inputs (by input position) from that of its outputs."""
        ins = [None if s < 0 else env[s] for s in step.ins]
        live = [p for p in step.live if ins[p] is not None and ins[p].is_floating_point()]
        if not live:
            return {}
        op, out = step.call.op_type, env[step.outs[0]]
        if op in LAYERS and live == [0] and step.constant_weight:
            return {0: self._layer(step, ins[0], ins[1], routs[0])}
        if op in ROUTED or (op in SUMS and len(live) > 1) or (op in LAYERS and len(live) == 1):

            def fn(*leaves: Tensor) -> Tensor | tuple[Tensor, ...]:
                args = list(ins)
                for position, leaf in zip(live, leaves, strict=True):
                    args[position] = leaf
                return step.handler(args[:2] if op in ("Gemm", "Conv", "ConvTranspose") else args, step.call)

            return dict(zip(live, _gradient_x_input(fn, [ins[p] for p in live], routs, self.eps), strict=True))
        same = [p for p in live if out is not None and ins[p].shape == out.shape]
        if len(live) == 1 and same and all(r is None for r in routs[1:]):
            return {live[0]: routs[0]}
        if op in GATES and len(live) == 2 and same:
            return {same[0]: routs[0]}
        shapes = ", ".join(str(tuple(ins[p].shape)) for p in live)
        raise LrpUnsupportedError(
            f"no LRP rule for {op} at node '{step.name}' (data inputs of shapes {shapes}, output "
            f"{None if out is None else tuple(out.shape)}): only linear or piecewise-linear ops that change the "
            "shape, and element-wise ops with one data input, can pass relevance"
        )

    def _layer(self, step: _Step, x: Tensor, w: Tensor, rout: Tensor) -> Tensor:
        """A constant-weight layer, bias ignored: z^B first, z+ for convolutions, epsilon for Gemm and MatMul."""
        call, handler, eps = step.call, step.handler, self.eps
        positive, negative = w.clamp(min=0), w.clamp(max=0)
        if step.first:
            low, high = (torch.full_like(x, bound) for bound in self.bounds)

            def bounded(a: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
                return handler([a, w], call) - handler([lo, positive], call) - handler([hi, negative], call)

            return reduce(torch.add, _gradient_x_input(bounded, [x, low, high], [rout], eps))
        if call.op_type in ("Conv", "ConvTranspose"):
            if x.min() >= 0:
                return _gradient_x_input(lambda a: handler([a, positive], call), [x], [rout], eps)[0]

            def z_plus(a: Tensor, b: Tensor) -> Tensor:
                return handler([a, positive], call) + handler([b, negative], call)

            return reduce(torch.add, _gradient_x_input(z_plus, [x.clamp(min=0), x.clamp(max=0)], [rout], eps))
        return _gradient_x_input(lambda a: handler([a, w], call), [x], [rout], eps)[0]


def _batches(x: np.ndarray, y: np.ndarray | None, size: int) -> list[tuple[Tensor, np.ndarray | None]]:
    if size < 1:
        raise DataError(f"batch_size must be >= 1, got {size}")
    if y is not None and len(y) != len(x):
        raise DataError(f"got {len(x)} inputs but {len(y)} labels")
    return [(torch.as_tensor(x[i : i + size]), None if y is None else y[i : i + size]) for i in range(0, len(x), size)]


def _propagator(model: ir.Model, x: np.ndarray, epsilon: float) -> _Propagator:
    if len(x) == 0:
        raise DataError("LRP needs at least one reference input")
    propagator = _Propagator(model, epsilon)
    if len(propagator.bridge._input_slots) != 1:
        raise ModelError(f"LRP supports models with one input, this one has {len(propagator.bridge._input_slots)}")
    propagator.bounds = (float(x.min()), float(x.max()))
    return propagator


def lrp_relevance(
    model: ir.Model, x: np.ndarray, y: np.ndarray | None = None, epsilon: float = 1e-6
) -> dict[str, np.ndarray]:
    """The relevance of every value (by name) that depends on the input, for the one batch ``x``.

    The map of a value has its shape; with ``epsilon`` small and no biases each sample's map sums to about 1.
    """
    propagator = _propagator(model, x, epsilon)
    relevance = propagator.relevance(torch.as_tensor(x), y, keep=None)
    names = {slot: value.name for value, slot in propagator.bridge._slots.items()}
    return {names[slot]: r.numpy() for slot, r in relevance.items()}


def lrp_scores(
    model: ir.Model,
    analysis: ChannelGraph,
    x: np.ndarray,
    y: np.ndarray | None = None,
    batch_size: int = 32,
    epsilon: float = 1e-6,
) -> np.ndarray:
    """One relevance score per class of ``analysis`` (higher = more relevant), from the reference inputs ``x``.

    ``analysis`` must be of ``model`` as it is. Each sample is explained at its label in ``y``, or
    at the model's predicted class when ``y`` is None. A unit's relevance is ``sum |R|`` over the
    batch and the positions of its layer's output at its channel, summed over all batches; it is
    divided by its layer's mean unit relevance, and a class's score is the mean over its units.
    The propagation rules are listed in the module's docstring.
    """
    x = np.asarray(x, dtype=np.float32)
    propagator = _propagator(model, x, epsilon)
    nodes = list(dict.fromkeys(source.node for source in analysis.sources))
    node_of_unit = np.array([nodes.index(s.node) for s in analysis.sources] if nodes else [], dtype=np.int64)
    outputs = {}  # slot of a source node's output -> (channel map, the units made there)
    for index, node in enumerate(nodes):
        value = node.outputs[0]
        if value in analysis.maps and value in propagator.bridge._slots:
            channel_map = analysis.maps[value]
            outputs[propagator.slot(value)] = (channel_map, node_of_unit[channel_map.ids] == index)
    units = np.zeros(len(analysis.sources))
    for batch, labels in _batches(x, y, batch_size):
        relevance = propagator.relevance(batch, labels, keep=set(outputs))
        for slot, (channel_map, own) in outputs.items():
            if slot not in relevance:
                continue
            r = relevance[slot].abs()
            axes = list(range(channel_map.axis % r.dim(), channel_map.axis % r.dim() + channel_map.ids.ndim))
            per_channel = r.sum([a for a in range(r.dim()) if a not in axes]).double().numpy()
            np.add.at(units, channel_map.ids[own], per_channel[own])
    for index in range(len(nodes)):
        members = node_of_unit == index
        units[members] /= max(float(units[members].mean()), 1e-12)
    return np.array([units[list(members)].mean() for members in analysis.classes], dtype=np.float64)
