"""Rewrite rules from QDQ form to onnxruntime's fused integer operators.

Each rule is pattern / check / rewrite (after onnxscript's rewriter). The
pattern is ``DequantizeLinear -> op -> [Relu|Clip] -> QuantizeLinear``; a check
that rejects says why (``Rejection``); the rewrite replaces the float op and its
Q with one integer op that reads the quantized inputs directly, so no
Q -> DQ -> Q chain survives. What no rule takes stays in QDQ form, which
onnxruntime still runs correctly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from compressor.backends.float_fallback import fold_dequantized_constants, run_in_float
from compressor.quantization.plan import STORED_WEIGHT_INPUTS

MS_DOMAIN = "com.microsoft"
SAME_PARAMS_OPS = frozenset({"MaxPool", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"})


class Rejection(Exception):
    """Why a rule does not apply to a node."""


@dataclass(frozen=True)
class Quantized:
    """A quantized tensor as seen through its DequantizeLinear: the integer value and its params."""

    value: ir.Value
    scale: ir.Value
    zero_point: ir.Value

    @classmethod
    def made_by(cls, quantize: ir.Node) -> Quantized:
        """The tensor a QuantizeLinear produces, with the params it quantizes with."""
        return cls(quantize.outputs[0], quantize.inputs[1], quantize.inputs[2])

    def params(self) -> list[ir.Value]:
        return [self.value, self.scale, self.zero_point]


@dataclass(frozen=True)
class Match:
    """A float op between dequantized inputs and one QuantizeLinear (with an optional fused activation)."""

    node: ir.Node
    inputs: list[Quantized]
    activation: ir.Node | None
    quantize: ir.Node

    @property
    def output(self) -> Quantized:
        return Quantized.made_by(self.quantize)

    def old_nodes(self) -> list[ir.Node]:
        return [n for n in (self.node, self.activation, self.quantize) if n is not None]


def dequantized(value: ir.Value | None) -> Quantized:
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "DequantizeLinear":
        raise Rejection(f"input {value.name if value else '?'} is not dequantized")
    zero = producer.inputs[2] if len(producer.inputs) > 2 else None
    if zero is None:
        raise Rejection("DequantizeLinear without a zero point")
    return Quantized(producer.inputs[0], producer.inputs[1], zero)


def match(node: ir.Node, activation_inputs: list[int]) -> Match:
    """Find the Q (after an optional fusable Relu/Clip) that consumes ``node``'s only output."""
    inputs = [dequantized(node.inputs[i]) for i in activation_inputs]
    output = node.outputs[0]
    activation = None
    consumer = _sole_consumer(output)
    if consumer.op_type in ("Relu", "Clip"):
        activation, consumer = consumer, _sole_consumer(consumer.outputs[0])
    if consumer.op_type != "QuantizeLinear":
        raise Rejection("output is not quantized")
    if consumer.outputs[0].dtype == ir.DataType.INT16:
        raise Rejection("output is int16 (the int16 fallback's input): no int8 operator writes int16")
    found = Match(node, inputs, activation, consumer)
    if activation is not None:
        _check_activation_absorbed(found)
    return found


def _sole_consumer(value: ir.Value) -> ir.Node:
    uses = list(value.uses())
    if value.is_graph_output():
        raise Rejection(f"{value.name} is a float graph output")
    if len(uses) != 1:
        raise Rejection(f"{value.name} has {len(uses)} consumers")
    return uses[0].node


def _check_activation_absorbed(found: Match) -> None:
    """Relu/Clip vanish only when the output's integer range already clamps to them."""
    scale, zero = _const(found.quantize.inputs[1]), _const(found.quantize.inputs[2])
    info = np.iinfo(zero.dtype)
    low, high = (info.min - zero) * scale, (info.max - zero) * scale
    activation = found.activation
    bounds = [0.0, np.inf] if activation.op_type == "Relu" else [-np.inf, np.inf]
    if activation.op_type == "Clip":
        for index in (1, 2):
            if len(activation.inputs) > index and activation.inputs[index] is not None:
                bounds[index - 1] = float(_const(activation.inputs[index]))
    if not (low >= bounds[0] - 1e-12 and high <= bounds[1] + 1e-6 * max(1.0, abs(bounds[1]))):
        raise Rejection(f"{activation.op_type} is not absorbed by the output range [{low:g}, {high:g}]")


def _const(value: ir.Value) -> np.ndarray:
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        raise Rejection(f"{value.name} is not constant")
    return tensor.numpy()


def _replace(graph: ir.Graph, found: Match, new_nodes: list[ir.Node]) -> None:
    """Swap the matched float chain for ``new_nodes``; the last one's output takes the Q output's place."""
    ir.convenience.replace_nodes_and_values(
        graph, found.quantize, found.old_nodes(), new_nodes, [found.quantize.outputs[0]], [new_nodes[-1].outputs[0]]
    )


def _attributes(node: ir.Node) -> list[ir.Attr]:
    return list(node.attributes.values())


def lower_conv(graph: ir.Graph, node: ir.Node) -> None:
    found = match(node, [0])
    weight = dequantized(node.inputs[1])
    if np.any(_const(weight.zero_point) != 0):
        raise Rejection("weight zero point is not 0 (asymmetric weights)")
    # One shared scalar zero serves every per-channel weight: QLinearConv accepts it, and it saves a byte per channel.
    weight = Quantized(weight.value, weight.scale, _shared_zero(graph, weight.zero_point))
    inputs = [*found.inputs[0].params(), *weight.params(), *found.output.params()[1:]]
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = dequantized(node.inputs[2])
        if bias.value.dtype != ir.DataType.INT32:
            raise Rejection("bias is not int32")
        inputs.append(bias.value)
    _replace(graph, found, [ir.Node("", "QLinearConv", inputs, attributes=_attributes(node), name=node.name)])


def _shared_zero(graph: ir.Graph, like: ir.Value) -> ir.Value:
    name = f"shared_zero_{like.dtype.name.lower()}"
    if name not in graph.initializers:
        zero = ir.Value(name=name, shape=ir.Shape([]), type=ir.TensorType(like.dtype))
        zero.const_value = ir.Tensor(np.zeros((), like.dtype.numpy()), name=name)
        graph.register_initializer(zero)
    return graph.initializers[name]


def lower_matmul(graph: ir.Graph, node: ir.Node) -> None:
    """MatMul -> QLinearMatMul; Gemm -> QGemm (com.microsoft), with a float output when nothing quantizes it."""
    weight = dequantized(node.inputs[1])
    if np.any(_const(weight.zero_point) != 0):
        raise Rejection("weight zero point is not 0 (asymmetric weights)")
    try:
        found = match(node, [0])
    except Rejection:
        if node.op_type != "Gemm":
            raise
        _lower_gemm_float_output(graph, node, weight)
        return
    if node.op_type == "MatMul":
        inputs = [*found.inputs[0].params(), *weight.params(), *found.output.params()[1:]]
        _replace(graph, found, [ir.Node("", "QLinearMatMul", inputs, name=node.name)])
        return
    inputs = [*found.inputs[0].params(), *weight.params(), _gemm_bias(node), *found.output.params()[1:]]
    _replace(graph, found, [ir.Node(MS_DOMAIN, "QGemm", inputs, attributes=_gemm_attributes(node), name=node.name)])


def _lower_gemm_float_output(graph: ir.Graph, node: ir.Node, weight: Quantized) -> None:
    source = dequantized(node.inputs[0])
    inputs = [*source.params(), *weight.params(), _gemm_bias(node)]
    qgemm = ir.Node(MS_DOMAIN, "QGemm", inputs, attributes=_gemm_attributes(node), name=node.name)
    ir.convenience.replace_nodes_and_values(graph, node, [node], [qgemm], [node.outputs[0]], [qgemm.outputs[0]])


def _gemm_bias(node: ir.Node) -> ir.Value | None:
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is None:
        return None
    quantized = dequantized(bias)
    if quantized.value.dtype != ir.DataType.INT32:
        raise Rejection("bias is not int32")
    return quantized.value


def _gemm_attributes(node: ir.Node) -> list[ir.Attr]:
    return [a for a in _attributes(node) if a.name in ("transA", "transB", "alpha")]


def lower_conv_transpose(graph: ir.Graph, node: ir.Node) -> None:
    raise Rejection("onnxruntime's CPU provider has no int8 ConvTranspose: runs in float on its int8 weights")


def lower_add(graph: ir.Graph, node: ir.Node) -> None:
    found = match(node, [0, 1])
    a, b = found.inputs
    inputs = [*a.params(), *b.params(), *found.output.params()[1:]]
    _replace(graph, found, [ir.Node(MS_DOMAIN, "QLinearAdd", inputs, name=node.name)])


def lower_global_average_pool(graph: ir.Graph, node: ir.Node) -> None:
    found = match(node, [0])
    inputs = [*found.inputs[0].params(), *found.output.params()[1:]]
    attrs = [ir.AttrInt64("channels_last", 0)]
    _replace(graph, found, [ir.Node(MS_DOMAIN, "QLinearGlobalAveragePool", inputs, attributes=attrs, name=node.name)])


def lower_average_pool(graph: ir.Graph, node: ir.Node) -> None:
    found = match(node, [0])
    inputs = [*found.inputs[0].params(), *found.output.params()[1:]]
    _replace(
        graph, found, [ir.Node(MS_DOMAIN, "QLinearAveragePool", inputs, attributes=_attributes(node), name=node.name)]
    )


def lower_concat(graph: ir.Graph, node: ir.Node) -> None:
    found = match(node, list(range(len(node.inputs))))
    inputs = [*found.output.params()[1:]]
    for quantized in found.inputs:
        inputs += quantized.params()
    _replace(graph, found, [ir.Node(MS_DOMAIN, "QLinearConcat", inputs, attributes=_attributes(node), name=node.name)])


def lower_same_params(graph: ir.Graph, node: ir.Node) -> None:
    """MaxPool, Reshape, ... run on the integer tensor when input and output share params."""
    found = match(node, [0])
    source, target = found.inputs[0], found.output
    if found.activation is not None:
        raise Rejection("activation after a pass-through op")
    _check_same_params(source, target)
    rest = list(node.inputs[1:])
    new = ir.Node(node.domain, node.op_type, [source.value, *rest], attributes=_attributes(node), name=node.name)
    _replace(graph, found, [new])


def lower_split(graph: ir.Graph, node: ir.Node) -> None:
    """Split runs on the integer tensor when every output is quantized with the input's params."""
    source = dequantized(node.inputs[0])
    quantizes = [_sole_consumer(output) for output in node.outputs]
    if any(q.op_type != "QuantizeLinear" for q in quantizes):
        raise Rejection("an output is not quantized")
    for quantize in quantizes:
        _check_same_params(source, Quantized.made_by(quantize))
    new = ir.Node(node.domain, node.op_type, [source.value, *node.inputs[1:]], attributes=_attributes(node),
                  num_outputs=len(node.outputs), name=node.name)  # fmt: skip
    old_outputs = [q.outputs[0] for q in quantizes]
    ir.convenience.replace_nodes_and_values(graph, quantizes[-1], [node, *quantizes], [new], old_outputs, new.outputs)


def lower_pad(graph: ir.Graph, node: ir.Node) -> None:
    """A constant-mode Pad runs on the integer tensor with the zero point as its pad value."""
    mode = node.attributes["mode"].as_string() if "mode" in node.attributes else "constant"
    if mode != "constant":
        raise Rejection(f"Pad mode {mode!r} is not constant")
    pad_value = node.inputs[2] if len(node.inputs) > 2 else None
    if pad_value is not None and float(_const(pad_value)) != 0.0:
        raise Rejection("Pad value is not 0")
    found = match(node, [0])
    source = found.inputs[0]
    _check_same_params(source, found.output)
    zero = source.zero_point
    axes = [node.inputs[3]] if len(node.inputs) > 3 else []
    new = ir.Node("", "Pad", [source.value, node.inputs[1], zero, *axes], attributes=_attributes(node), name=node.name)
    _replace(graph, found, [new])


def _check_same_params(source: Quantized, target: Quantized) -> None:
    pairs = ((source.scale, target.scale), (source.zero_point, target.zero_point))
    if not all(np.array_equal(_const(x), _const(y)) for x, y in pairs):
        raise Rejection("input and output quantization parameters differ")


RULES: dict[str, Callable[[ir.Graph, ir.Node], None]] = {
    "Pad": lower_pad,
    "Conv": lower_conv,
    "ConvTranspose": lower_conv_transpose,
    "MatMul": lower_matmul,
    "Gemm": lower_matmul,
    "Add": lower_add,
    "GlobalAveragePool": lower_global_average_pool,
    "AveragePool": lower_average_pool,
    "Concat": lower_concat,
    "Split": lower_split,
    **{op: lower_same_params for op in SAME_PARAMS_OPS},
}


WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def _reads_dequantized(node: ir.Node) -> bool:
    return any(value is not None and value.producer() is not None and value.producer().op_type == "DequantizeLinear"
               for value in node.inputs)  # fmt: skip


def _reads_int16(node: ir.Node) -> bool:
    return any(value is not None and value.producer() is not None and value.producer().op_type == "DequantizeLinear"
               and value.producer().inputs[0].dtype == ir.DataType.INT16 for value in node.inputs)  # fmt: skip


def lower_to_qlinear(model: ir.Model) -> dict[str, str]:
    """Rewrite every matching QDQ island in place; return node name -> why it stayed in QDQ form.

    A Conv, ConvTranspose, Gemm or MatMul that stays in QDQ form runs in float
    on its int8 weights (`run_in_float`), and so does an op whose weights are only stored in int8.
    """
    rejected: dict[str, str] = {}
    for node in list(model.graph):
        if node.op_type in STORED_WEIGHT_INPUTS and _reads_dequantized(node):  # `quantize_stored_input`
            fold_dequantized_constants(model.graph, node, STORED_WEIGHT_INPUTS[node.op_type])
        rule = RULES.get(node.op_type)
        if rule is None or node.domain not in ("", "ai.onnx") or not _reads_dequantized(node):
            continue  # not in QDQ form: float by the quantizer's choice, or already integer
        if _reads_int16(node):
            continue  # INT16 DFP (int8's int16 fallback): onnxruntime has no int16 kernels, it runs as QDQ
        try:
            rule(model.graph, node)
        except Rejection as why:
            rejected[node.name or node.op_type] = str(why)
            if node.op_type in WEIGHTED_OPS:
                run_in_float(model.graph, node)
    if any(node.domain == MS_DOMAIN for node in model.graph):
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    RemoveUnusedNodesPass()(model)
    return rejected
