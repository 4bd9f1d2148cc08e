"""The int8 quantization plan: which nodes of a float graph run quantized, and which tensors get Q/DQ.

`compressor.quantization.int8` calibrates the tensors a plan
names and rewrites the graph by it; the latency guard and the weight-only pass
read the op sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnx_ir as ir

if TYPE_CHECKING:
    from compressor.quantization.int8_config import QuantizeInt8Config

COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
ELEMENTWISE_OPS = frozenset({"Add", "Concat", "GlobalAveragePool", "AveragePool"})
PASS_THROUGH_OPS = frozenset({"MaxPool", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Pad", "Split"})
QUANTIZABLE_OPS = COMPUTE_OPS | ELEMENTWISE_OPS | PASS_THROUGH_OPS  # every other op has no int8 form here
FUSED_ACTIVATIONS = frozenset({"Relu", "Clip"})
SHAPE_OPS = frozenset({"Shape", "Size", "Identity", "Cast"})  # read float tensors, compute nothing to quantize
INTEGER_TYPES = frozenset({ir.DataType.INT64, ir.DataType.INT32, ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.BOOL})
# Ops with no int8 kernel here whose constant weights can still be stored in int8, a scale per row:
# op -> {input index: role}. A Gather's row is what one index gathers; an LSTM's, GRU's or RNN's
# weight [directions, gates * hidden, size] has a row per gate unit (axis 1).
STORED_WEIGHT_INPUTS: dict[str, dict[int, str]] = {
    "Gather": {0: "table"},
    **{op: {1: "weight", 2: "recurrence"} for op in ("LSTM", "GRU", "RNN")},
}
STORED_MIN_ROW_VALUES = 8  # a row's scale takes 2 to 4 bytes: shorter rows gain too little from int8


@dataclass
class QuantizationPlan:
    """Which nodes of a float graph run quantized under a config, and which tensors get a Q/DQ pair."""

    quantized: list[ir.Node]
    compute: list[ir.Node]
    tensors: dict[str, ir.Value]  # name -> value to quantize
    shared: dict[str, str]  # pass-through output -> input whose params it reuses
    skipped: dict[str, str]
    # Ops with no int8 form (HardSwish, Sigmoid, Resize, Shape...) that read a quantized node's output
    # through its DequantizeLinear, as every quantized consumer does: the producer then hands one
    # integer tensor to all its consumers and runs as a fused integer op instead of staying float.
    readers: set[int]
    stored: list[tuple[ir.Node, int, int]]  # (node, input, row axis) stored in int8 (``config.int8_storage``)

    def observed(self) -> list[str]:
        return [name for name in self.tensors if name not in self.shared]

    @classmethod
    def build(cls, graph: ir.Graph, config: QuantizeInt8Config) -> QuantizationPlan:
        quantized, compute, skipped, stored = [], [], {}, []
        for node in graph:
            inputs = _stored_inputs(node, config) if config.int8_storage else []
            if inputs:
                stored += [(node, index, axis) for index, axis in inputs]
                roles = " and ".join(STORED_WEIGHT_INPUTS[node.op_type][index] for index, _ in inputs)
                skipped[node.name or node.op_type] = (
                    f"{node.op_type} runs in float, its {roles} stored in int8 (a scale a row)"
                )
                continue
            if node.op_type not in QUANTIZABLE_OPS:
                if node.op_type not in FUSED_ACTIVATIONS | SHAPE_OPS and _activation_inputs(node):
                    skipped[node.name or node.op_type] = f"{node.op_type} has no int8 form here: runs in float"
                continue
            if node.inputs and node.inputs[0] is not None and node.inputs[0].dtype in INTEGER_TYPES:
                continue  # shape arithmetic (Concat, Reshape... of int64 dims): nothing to quantize or report
            reason = _why_float(node, config)
            if reason:
                skipped[node.name or node.op_type] = reason
                continue
            quantized.append(node)
            if node.op_type in COMPUTE_OPS:
                compute.append(node)
        tensors: dict[str, ir.Value] = {}
        shared: dict[str, str] = {}
        chosen, readers = set(), set()
        for node in quantized:
            if node.op_type in PASS_THROUGH_OPS:
                continue
            chosen.add(id(node))
            for value in _activation_inputs(node):
                tensors.setdefault(value.name, value)
            output = _fused_output(node)
            consumers = [use.node for use in output.uses()]
            float_readers = [c for c in consumers if _has_no_int8_form(c, config) or _int16_later(c, config)]
            # A compute op's output is quantized for float-only readers too (so it runs fused); with the int16
            # fallback, any op's that feeds nodes the fallback converts.
            ours = node.op_type in COMPUTE_OPS or any(_int16_later(c, config) for c in consumers)
            feeds_float_only = ours and consumers and len(float_readers) == len(consumers)
            if any(_consumer_is_quantized(use, quantized) for use in output.uses()) or feeds_float_only:
                tensors.setdefault(output.name, output)
                if not output.is_graph_output():  # then the producer can run in int8: see `QuantizationPlan.readers`
                    readers.update(id(c) for c in float_readers)
        # Pass-through ops run on the integer tensor only when their input is quantized.
        for node in quantized:
            if node.op_type in PASS_THROUGH_OPS and node.inputs[0].name in tensors:
                chosen.add(id(node))
                for output in node.outputs:  # Split has several
                    shared[output.name] = shared.get(node.inputs[0].name, node.inputs[0].name)
                    tensors[output.name] = output
        quantized = [n for n in quantized if id(n) in chosen]
        return cls(quantized, [n for n in compute if id(n) in chosen], tensors, shared, skipped, readers, stored)


def _stored_inputs(node: ir.Node, config: QuantizeInt8Config) -> list[tuple[int, int]]:
    """(input, row axis) of ``node``'s float constant weights to store in int8: rows long enough,
    and read by nothing else (int8 beside a float copy would add bytes)."""
    roles = STORED_WEIGHT_INPUTS.get(node.op_type)
    if roles is None or node.domain not in ("", "ai.onnx") or node.name in config.keep_float:
        return []
    found = []
    for index in roles:
        value = node.inputs[index] if len(node.inputs) > index else None
        if value is None or value.const_value is None or value.dtype != ir.DataType.FLOAT or len(value.uses()) != 1:
            continue
        shape = value.const_value.shape
        if node.op_type == "Gather":
            axis = (node.attributes["axis"].as_int() if "axis" in node.attributes else 0) % max(len(shape), 1)
        else:
            axis = 1
        if len(shape) >= 2 and value.const_value.size // shape[axis] >= STORED_MIN_ROW_VALUES:
            found.append((index, axis))
    return found


def _why_float(node: ir.Node, config: QuantizeInt8Config) -> str | None:
    if node.name in config.keep_float:
        return "kept in float by configuration"
    if node.domain not in ("", "ai.onnx"):
        return f"custom domain {node.domain}"
    if any(v is not None and v.dtype not in (None, ir.DataType.FLOAT) for v in node.inputs[:1]):
        return "input is not float32"
    if node.op_type in COMPUTE_OPS:
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        if weight is None or weight.const_value is None:
            return f"weight of {node.op_type} is not constant"
        if node.op_type == "MatMul" and len(weight.const_value.shape) != 2:
            return "MatMul weight is not 2-D"
        if node.op_type == "Gemm":
            attrs = node.attributes
            if attrs.get("transA") and attrs["transA"].as_int():
                return "Gemm with transA"
            if any(a in attrs and attrs[a].as_float() != 1.0 for a in ("alpha", "beta")):
                return "Gemm with alpha/beta != 1"
    return None


def _activation_inputs(node: ir.Node) -> list[ir.Value]:
    if node.op_type in COMPUTE_OPS:
        return [node.inputs[0]]
    return [v for v in node.inputs if v is not None and v.const_value is None and v.dtype == ir.DataType.FLOAT]


def _fused_output(node: ir.Node) -> ir.Value:
    """The output to quantize: after a sole Relu/Clip consumer, else the node's own output."""
    output = node.outputs[0]
    uses = list(output.uses())
    if len(uses) == 1 and not output.is_graph_output():
        consumer = uses[0].node
        if consumer.op_type in FUSED_ACTIVATIONS and _constant_clip(consumer):
            return consumer.outputs[0]
    return output


def _constant_clip(node: ir.Node) -> bool:
    """Relu, or a Clip whose bounds are constants (initializers or Constant nodes)."""
    return node.op_type == "Relu" or all(
        v is None or ir.convenience.get_const_tensor(v) is not None for v in node.inputs[1:]
    )


def _has_no_int8_form(node: ir.Node, config: QuantizeInt8Config) -> bool:
    return node.op_type not in QUANTIZABLE_OPS and node.name not in config.keep_float


def _int16_later(node: ir.Node, config: QuantizeInt8Config) -> bool:
    """A node int8 leaves in float that the int16 fallback converts: it reads int8 tensors, requantized to int16."""
    return config.fallback == "int16" and node.name in config.keep_float


def _consumer_is_quantized(use: ir.Usage, quantized: list[ir.Node]) -> bool:
    return any(use.node is node for node in quantized)
