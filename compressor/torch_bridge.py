"""Run an onnx-ir model in torch, so that its weights can be trained (pruning fine-tuning, QAT).

`TorchBridge` is an ``nn.Module`` in the style of torch.fx's Interpreter: it walks the
graph's nodes in order and hands each to a small handler in `compressor.torch_ops`. The
model's float initializers become ``nn.Parameter``s (looked up by ONNX name with
`TorchBridge.parameter_for`); the other constants become buffers. `TorchBridge.write_back`
copies the trained values into the IR model's initializers, in their own dtype and shape.

    bridge = TorchBridge(model)
    loss = criterion(bridge(x)[0], y); loss.backward(); optimizer.step()
    bridge.write_back()

Every node is checked when the bridge is built: an op it cannot run (an unknown op,
another domain, a nested graph) raises `UnsupportedOpError` before any data is seen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from compressor.errors import DataError, ModelError
from compressor.torch_ops import CHECKS, OPS, SUPPORTED, Call, Handler

__all__ = ["NodeExecutionError", "TorchBridge", "UnsupportedOpError"]

_FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
_NESTED = frozenset({ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS})
_CONSTANT_ATTRS = ("value_float", "value_floats", "value_int", "value_ints")


class UnsupportedOpError(ModelError):
    """The model holds a node the torch bridge cannot run; raised when the bridge is built."""

    def __init__(self, nodes: list[tuple[str, str, str, str]]) -> None:
        """``nodes``: (op type, node name, domain, reason) of every node the bridge refuses, first one first."""
        self.op_types = sorted({op_type for op_type, *_ in nodes})
        described = [
            f"{op} at node '{name}' (domain '{domain or 'ai.onnx'}'): {why}" for op, name, domain, why in nodes
        ]
        more = f" (and {len(described) - 3} more)" if len(described) > 3 else ""
        super().__init__(
            f"the torch bridge cannot run {'; '.join(described[:3])}{more}; "
            f"the bridge supports: {', '.join(sorted(SUPPORTED))} (domain ai.onnx, no nested graphs)"
        )


class NodeExecutionError(DataError):
    """A node failed while the bridge ran it; the message names the node and the op."""


def _to_torch(array: np.ndarray, widen: bool) -> torch.Tensor:
    """A copy of ``array`` as a tensor; with ``widen`` integers become int64 (the shape-computing dtype)."""
    if array.dtype.kind in "iu" and widen:
        return torch.tensor(array.astype(np.int64))
    if array.dtype.kind == "V" or str(array.dtype) == "bfloat16":  # ml_dtypes' bfloat16
        return torch.tensor(array.astype(np.float32)).to(torch.bfloat16)
    return torch.tensor(array)


def _attribute(attr: ir.Attr) -> Any:
    if attr.type == ir.AttributeType.TENSOR:
        return _to_torch(attr.as_tensor().numpy(), widen=False)
    if attr.type in (ir.AttributeType.FLOATS, ir.AttributeType.INTS, ir.AttributeType.STRINGS):
        return list(attr.value)
    return attr.value


def _describe(node: ir.Node, index: int) -> str:
    return node.name or f"#{index} ({', '.join(v.name or '?' for v in node.outputs)})"


class TorchBridge(nn.Module):
    """Runs an onnx_ir model in torch; its float initializers are nn.Parameters."""

    def __init__(self, model: ir.Model, trainable: Callable[[str], bool] | None = None) -> None:
        """Plan the run of ``model.graph``; ``trainable(name)`` says which float initializers get gradients (all).

        Raises `UnsupportedOpError` naming every node the bridge cannot run.
        """
        super().__init__()
        self.model = model
        graph = model.graph
        default_opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        self._check(graph)
        self._slots: dict[ir.Value, int] = {}
        self.params = nn.ParameterList()
        self._param_index: dict[str, int] = {}
        self._param_slots: list[tuple[int, int]] = []  # (slot, index in self.params)
        self._buffer_slots: list[tuple[int, str]] = []  # (slot, buffer name)
        for name, value in graph.initializers.items():
            if value.const_value is not None:
                self._constant(value, value.const_value.numpy(), name, trainable)
        self._input_slots = [self._slot(v) for v in graph.inputs if v.name not in graph.initializers]
        self._input_names = [v.name for v in graph.inputs if v.name not in graph.initializers]
        self._plan: list[tuple[Handler, Call, list[int], list[int], str]] = []
        for index, node in enumerate(graph):
            if node.op_type == "Constant":
                self._constant(node.outputs[0], self._constant_array(node), None, None)
                continue
            attrs = {name: _attribute(attr) for name, attr in node.attributes.items()}
            opset = node.version or model.opset_imports.get(node.domain, default_opset)
            call = Call(node.op_type, attrs, opset, len(node.outputs))
            ins = [-1 if v is None else self._slot(v) for v in node.inputs]
            outs = [self._slot(v) for v in node.outputs]
            self._plan.append((OPS[node.op_type], call, ins, outs, _describe(node, index)))
        self._output_slots = [self._slot(v) for v in graph.outputs]

    def _check(self, graph: ir.Graph) -> None:
        refused = []
        for index, node in enumerate(graph):
            domain, reason = node.domain, None
            if domain not in ("", "ai.onnx"):
                reason = "ops of other domains are not supported"
            elif any(attr.type in _NESTED for attr in node.attributes.values()):
                reason = "nested graphs (If, Loop, Scan) are not supported"
            elif node.op_type not in SUPPORTED:
                reason = "the op is not supported"
            elif node.op_type in CHECKS:
                attrs = {name: _attribute(attr) for name, attr in node.attributes.items()}
                problem = CHECKS[node.op_type](Call(node.op_type, attrs, 18, len(node.outputs)))
                reason = f"{problem} is not supported" if problem else None
            elif node.op_type == "Constant" and not (set(node.attributes) & {"value", *_CONSTANT_ATTRS}):
                reason = f"a Constant given by {', '.join(node.attributes)} is not supported"
            if reason:
                refused.append((node.op_type, _describe(node, index), domain, reason))
        if refused:
            raise UnsupportedOpError(refused)

    @staticmethod
    def _constant_array(node: ir.Node) -> np.ndarray:
        if "value" in node.attributes:
            return node.attributes["value"].as_tensor().numpy()
        name = next(n for n in _CONSTANT_ATTRS if n in node.attributes)
        return np.asarray(node.attributes[name].value, dtype=np.float32 if "float" in name else np.int64)

    def _slot(self, value: ir.Value) -> int:
        return self._slots.setdefault(value, len(self._slots))

    def _constant(
        self, value: ir.Value, array: np.ndarray, name: str | None, trainable: Callable[[str], bool] | None
    ) -> None:
        """An initializer (``name`` given) or a Constant's output: a Parameter if it is a float initializer."""
        slot = self._slot(value)
        tensor = _to_torch(array, widen=True)
        if name is not None and ir.DataType.from_numpy(array.dtype) in _FLOATS:
            grad = True if trainable is None else bool(trainable(name))
            self._param_index[name] = len(self.params)
            self._param_slots.append((slot, len(self.params)))
            self.params.append(nn.Parameter(tensor, requires_grad=grad))
        else:
            buffer = f"const_{slot}"
            self.register_buffer(buffer, tensor)
            self._buffer_slots.append((slot, buffer))

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The graph's outputs, in order, for its (non-initializer) inputs in order."""
        if len(inputs) != len(self._input_slots):
            raise DataError(f"the model takes {len(self._input_slots)} inputs ({', '.join(self._input_names)}), "
                            f"got {len(inputs)}")  # fmt: skip
        env: list[torch.Tensor | None] = [None] * len(self._slots)
        for slot, index in self._param_slots:
            env[slot] = self.params[index]
        for slot, buffer in self._buffer_slots:
            env[slot] = self._buffers[buffer]
        for slot, tensor in zip(self._input_slots, inputs, strict=True):
            env[slot] = torch.as_tensor(tensor)
        for handler, call, ins, outs, name in self._plan:
            try:
                result = handler([None if i < 0 else env[i] for i in ins], call)
            except Exception as exc:
                raise NodeExecutionError(f"while executing node '{name}' ({call.op_type}): {exc}") from exc
            results = (result,) if isinstance(result, torch.Tensor) else tuple(result)
            for slot, tensor in zip(outs, results, strict=False):
                env[slot] = tensor
        return tuple(env[slot] for slot in self._output_slots)

    def parameter_for(self, initializer_name: str) -> nn.Parameter:
        """The Parameter holding the float initializer ``initializer_name``; KeyError if it has none."""
        try:
            return self.params[self._param_index[initializer_name]]
        except KeyError:
            raise KeyError(f"no float initializer named {initializer_name!r} in the bridged model") from None

    def write_back(self) -> list[str]:
        """Copy the parameters into the IR model's initializers (same dtype and shape); the names changed."""
        changed = []
        initializers = self.model.graph.initializers
        for name, index in self._param_index.items():
            value = initializers[name]
            old = value.const_value.numpy()
            tensor = self.params[index].detach().cpu()
            tensor = tensor.float() if tensor.dtype == torch.bfloat16 else tensor
            new = tensor.numpy().astype(old.dtype).reshape(old.shape)
            if not np.array_equal(old, new):
                value.const_value = ir.Tensor(new, name=name)
                changed.append(name)
        return changed
