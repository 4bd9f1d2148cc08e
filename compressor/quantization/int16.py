"""The INT16 plan: which nodes of a float graph run in dynamic fixed point, and why the others stay float.

`compressor.passes.quantize_int16` calibrates the tensors a plan names and
rewrites the graph by it. Every op here has a kernel in the integer reference
(`compressor.backends.integer_reference`); any other op runs as a float island.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from compressor.ir import constant_array
from compressor.quantization.int16_config import QuantizeInt16Config

WEIGHTED_OPS = frozenset({"Conv", "Gemm", "MatMul"})
ARITHMETIC_OPS = frozenset({"Add", "Sub", "Mul", "Clip", "AveragePool", "GlobalAveragePool", "Concat"})
# Outputs hold exactly the input's values (or a subset): they keep the input's exponent.
SAME_EXPONENT_OPS = frozenset(
    {"Relu", "MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Split", "Identity"}
)
INT16_OPS = WEIGHTED_OPS | ARITHMETIC_OPS | SAME_EXPONENT_OPS
# Ops that build a float tensor from shapes alone: the same values on every input, often all zero,
# so they have no calibrated range to take an exponent from.
SHAPE_BUILT_OPS = frozenset({"ConstantOfShape", "Range", "EyeLike"})
# Inputs read as plain integers or float constants, never as DFP tensors.
ATTRIBUTE_INPUTS = {"Reshape": (1,), "Squeeze": (1,), "Unsqueeze": (1,), "Split": (1,), "Clip": (1, 2)}


@dataclass
class Int16Plan:
    """The nodes that run in DFP, the activation tensors that get an int16 Q/DQ pair, and the float islands."""

    nodes: list[ir.Node]
    tensors: dict[str, ir.Value]  # name -> activation to quantize, in graph order
    shared: dict[str, str]  # output -> input whose exponent it keeps (`SAME_EXPONENT_OPS`)
    skipped: dict[str, str]  # node -> why it runs in float

    def observed(self) -> list[str]:
        """Tensors whose exponent comes from calibration."""
        return [name for name in self.tensors if name not in self.shared]

    @classmethod
    def build(cls, graph: ir.Graph, config: QuantizeInt16Config, only: frozenset[str] | None = None) -> Int16Plan:
        """The plan for ``graph``; with ``only``, for those nodes (and the Relu/Clip after them) alone.

        ``only`` is how int8's int16 fallback converts the nodes int8 left in float, in a QDQ graph; the
        data movement into them and the Relu/Clip after them come along.
        """
        nodes, skipped, chosen = [], {}, set()
        for node in graph:
            data = [v for v in node.inputs if v is not None]
            if data and all(v.dtype not in (None, ir.DataType.FLOAT) for v in data):
                continue  # shape arithmetic on int64 dims: nothing to quantize or report
            picked = only is None or node.name in only or _activation_after(node, chosen) or _moves_into(node, only)
            if not picked:
                continue
            reason = why_float(node, config)
            if reason is None:
                nodes.append(node)
                chosen.add(id(node))
            elif _reads_float(node):
                skipped[node.name or node.op_type] = reason
        tensors: dict[str, ir.Value] = {}
        shared: dict[str, str] = {}
        for node in nodes:
            for value in activation_inputs(node):
                tensors.setdefault(value.name, value)
            for output in node.outputs:
                tensors.setdefault(output.name, output)
                if node.op_type in SAME_EXPONENT_OPS:
                    source = node.inputs[0].name
                    shared[output.name] = shared.get(source, source)
        return cls(nodes, tensors, shared, skipped)


def why_float(node: ir.Node, config: QuantizeInt16Config) -> str | None:
    """Why ``node`` cannot run in INT16 DFP here, or None when it can."""
    op = node.op_type
    if node.name and node.name in config.keep_float:
        return "kept in float by configuration"
    if node.domain not in ("", "ai.onnx"):
        return f"custom domain {node.domain}: no integer kernel"
    if op not in INT16_OPS:
        return f"{op} has no integer kernel: runs as a float island"
    if any(v.dtype not in (None, ir.DataType.FLOAT) for v in activation_inputs(node)):
        return "input is not float32"
    built = [v for v in activation_inputs(node) if v.producer() is not None and v.producer().op_type in SHAPE_BUILT_OPS]
    if built:
        return f"input {built[0].name!r} is built from shapes at run time ({built[0].producer().op_type})"
    for index in ATTRIBUTE_INPUTS.get(op, ()):
        if len(node.inputs) > index and node.inputs[index] is not None and constant_array(node.inputs[index]) is None:
            return f"input {index} of {op} is not constant"
    attrs = node.attributes
    if op in WEIGHTED_OPS:
        weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if weight is None:
            return f"weight of {op} is not constant"
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and constant_array(bias) is None:
            return f"bias of {op} is not constant"
        if op == "MatMul" and weight.ndim != 2:
            return "MatMul weight is not 2-D"
        if op == "Gemm":
            if _int(attrs, "transA"):
                return "Gemm with transA"
            if any(a in attrs and attrs[a].as_float() != 1.0 for a in ("alpha", "beta")):
                return "Gemm with alpha/beta != 1"
            if bias is not None and constant_array(bias).ndim != 1:
                return "Gemm bias is not 1-D"
    if op in ("Conv", "MaxPool", "AveragePool") and attrs.get("auto_pad") and attrs["auto_pad"].as_string() != "NOTSET":
        return f"{op} with auto_pad"
    if op in ("MaxPool", "AveragePool") and _int(attrs, "ceil_mode"):
        return f"{op} with ceil_mode"
    if op == "MaxPool" and len(node.outputs) > 1:
        return "MaxPool with indices"
    return None


def activation_inputs(node: ir.Node) -> list[ir.Value]:
    """The inputs of ``node`` that are activations (not weights, biases or attribute-like constants)."""
    if node.op_type in WEIGHTED_OPS:
        return [node.inputs[0]]
    skip = ATTRIBUTE_INPUTS.get(node.op_type, ())
    return [
        v for i, v in enumerate(node.inputs)
        if v is not None and i not in skip and v.const_value is None and constant_array(v) is None
    ]  # fmt: skip


def constant_inputs(node: ir.Node) -> list[int]:
    """Indices of float constant inputs that are data (an Add's or Mul's constant operand)."""
    if node.op_type not in ("Add", "Sub", "Mul", "Concat"):
        return []
    return [
        i for i, v in enumerate(node.inputs)
        if v is not None and v.dtype == ir.DataType.FLOAT and constant_array(v) is not None
    ]  # fmt: skip


def _activation_after(node: ir.Node, chosen: set[int]) -> bool:
    """A Relu or Clip that reads a chosen node's output (int8 fuses these into the op before them)."""
    producer = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    return node.op_type in ("Relu", "Clip") and producer is not None and id(producer) in chosen


def _moves_into(node: ir.Node, only: frozenset[str]) -> bool:
    """Data movement (a Reshape before a Gemm) whose every reader is one of the ``only`` nodes."""
    uses = [use for output in node.outputs for use in output.uses()]
    return node.op_type in SAME_EXPONENT_OPS and bool(uses) and all(use.node.name in only for use in uses)


def _reads_float(node: ir.Node) -> bool:
    return any(v is not None and v.dtype == ir.DataType.FLOAT and v.const_value is None for v in node.inputs)


def _int(attrs: ir.Attributes | dict, name: str) -> int:
    return attrs[name].as_int() if name in attrs else 0
