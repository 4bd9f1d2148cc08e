"""int8 post-training quantization into QDQ form.

Every quantized activation tensor gets one QuantizeLinear -> DequantizeLinear
pair right after its producer; weights become int8 initializers behind a
DequantizeLinear (per channel on the output-channel axis), biases int32 with
scale s_x * s_w. This QDQ graph is the portable form onnxruntime runs as is;
the CPU backend lowers it further to fused QLinear* operators.

Relu/Clip that are the sole consumer of a quantized op are fused: the tensor
after the activation is quantized instead of the one before it, so the
activation disappears into the output range when lowered.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import PassResult
from onnx_ir.passes.common import RemoveUnusedNodesPass

from compressor import calibration
from compressor.errors import ModelError, UsageError
from compressor.ir import add_initializer
from compressor.pipeline import Pass, PassContext, Tolerance
from compressor.quant_params import QuantParams, activation_params, quantize_weight

COMPUTE_OPS = frozenset({"Conv", "Gemm", "MatMul"})
ELEMENTWISE_OPS = frozenset({"Add", "Concat", "GlobalAveragePool", "AveragePool"})
PASS_THROUGH_OPS = frozenset({"MaxPool", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"})
FUSED_ACTIVATIONS = frozenset({"Relu", "Clip"})
ALREADY_QUANTIZED_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm"}
)


@dataclass(frozen=True)
class QuantizeInt8Config:
    """The whole int8 tuning space: the tuner searches exactly these fields."""

    calibration: str = "minmax"  # one of compressor.calibration.METHODS
    percentile: float = 99.99
    num_samples: int = 256
    activations: str = "asymmetric_uint8"  # | "symmetric_int8" | "symmetric_uint8"
    weights: str = "symmetric"  # | "asymmetric"
    weight_bits: int = 7  # 7 keeps onnxruntime's u8s8 kernels on their fast, overflow-free path
    power_of_two: bool = False
    per_channel: bool = True
    bias_correction: bool = False
    keep_float: frozenset[str] = field(default_factory=frozenset)  # node names left in float
    batch_size: int = 8

    def __post_init__(self) -> None:
        checks = {
            "calibration": (self.calibration, calibration.METHODS),
            "activations": (self.activations, ("asymmetric_uint8", "symmetric_int8", "symmetric_uint8")),
            "weights": (self.weights, ("symmetric", "asymmetric")),
            "weight_bits": (self.weight_bits, (7, 8)),
        }
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise UsageError(f"int8 config: {name}={value!r} is not one of {', '.join(map(str, allowed))}")
        if not 50.0 < self.percentile <= 100.0:
            raise UsageError(f"int8 config: percentile={self.percentile} must be in (50, 100]")
        if self.num_samples < 1:
            raise UsageError("int8 config: num_samples must be >= 1")


class QuantizeInt8(Pass):
    """Calibrate on the context's data and rewrite the model into int8 QDQ form."""

    name = "quantize_int8"
    needs = frozenset({"calibration"})
    tolerance = Tolerance(max_relative_error=None, min_sqnr_db=10.0)

    def __init__(self, config: QuantizeInt8Config | None = None) -> None:
        super().__init__()
        self.config = config or QuantizeInt8Config()
        self.params: dict[str, QuantParams] = {}
        self.skipped: dict[str, str] = {}  # node name -> why it stayed in float

    def requires(self, model: ir.Model) -> None:
        found = sorted({n.op_type for n in model.graph if n.op_type in ALREADY_QUANTIZED_OPS})
        if found:
            raise ModelError(f"the model is already quantized (it has {', '.join(found)}); pass the float model")

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        plan = _Plan.build(graph, self.config)
        self.skipped = plan.skipped
        if not plan.tensors:
            return PassResult(model, False)
        context = PassContext.current()
        if context.calibration is None:
            raise ModelError("int8 quantization needs calibration data: pass --calib DATA.npz")
        levels = 256
        observers = {
            name: calibration.make_observer(self.config.calibration, self.config.percentile, levels)
            for name in plan.observed()
        }
        calibration.collect(
            model, context.calibration, observers, num_samples=self.config.num_samples,
            batch_size=self.config.batch_size,
        )  # fmt: skip
        self.params = {name: activation_params(*obs.range(), self.config) for name, obs in observers.items()}
        for alias, source in plan.shared.items():
            self.params[alias] = self.params[source]
        input_params = [self.params[node.inputs[0].name] for node in plan.compute]
        _insert_qdq(graph, plan, self.params)
        for node, params in zip(plan.compute, input_params, strict=True):
            _quantize_weights(graph, node, params, self.config)
        RemoveUnusedNodesPass()(model)  # drops the float weights the int8 ones replaced
        return PassResult(model, True)


@dataclass
class _Plan:
    """Which nodes run quantized and which tensors get a Q/DQ pair."""

    quantized: list[ir.Node]
    compute: list[ir.Node]
    tensors: dict[str, ir.Value]  # name -> value to quantize
    shared: dict[str, str]  # pass-through output -> input whose params it reuses
    skipped: dict[str, str]

    def observed(self) -> list[str]:
        return [name for name in self.tensors if name not in self.shared]

    @classmethod
    def build(cls, graph: ir.Graph, config: QuantizeInt8Config) -> _Plan:
        quantized, compute, skipped = [], [], {}
        for node in graph:
            if node.op_type not in COMPUTE_OPS | ELEMENTWISE_OPS | PASS_THROUGH_OPS:
                continue
            reason = _why_float(node, config)
            if reason:
                skipped[node.name or node.op_type] = reason
                continue
            quantized.append(node)
            if node.op_type in COMPUTE_OPS:
                compute.append(node)
        tensors: dict[str, ir.Value] = {}
        shared: dict[str, str] = {}
        chosen = set()
        for node in quantized:
            if node.op_type in PASS_THROUGH_OPS:
                continue
            chosen.add(id(node))
            for value in _activation_inputs(node):
                tensors.setdefault(value.name, value)
            output = _fused_output(node)
            if any(_consumer_is_quantized(use, quantized) for use in output.uses()):
                tensors.setdefault(output.name, output)
        # Pass-through ops run on the integer tensor only when their input is quantized.
        for node in quantized:
            if node.op_type in PASS_THROUGH_OPS and node.inputs[0].name in tensors:
                chosen.add(id(node))
                shared[node.outputs[0].name] = shared.get(node.inputs[0].name, node.inputs[0].name)
                tensors[node.outputs[0].name] = node.outputs[0]
        quantized = [n for n in quantized if id(n) in chosen]
        return cls(quantized, [n for n in compute if id(n) in chosen], tensors, shared, skipped)


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
    return node.op_type == "Relu" or all(v is None or v.const_value is not None for v in node.inputs[1:])


def _consumer_is_quantized(use: ir.Usage, quantized: list[ir.Node]) -> bool:
    return any(use.node is node for node in quantized)


def _insert_qdq(graph: ir.Graph, plan: _Plan, params: dict[str, QuantParams]) -> None:
    quantized_ids = {id(n) for n in plan.quantized}
    for name, value in plan.tensors.items():
        p = params[name]
        scale = add_initializer(graph, f"{name}_scale", np.array(p.scale, dtype=np.float32))
        zero = add_initializer(graph, f"{name}_zero_point", np.array(p.zero_point, dtype=p.dtype))
        quantize = ir.Node("", "QuantizeLinear", [value, scale, zero], name=f"{name}_quantize")
        quantize.outputs[0].name = f"{name}_quantized"
        dequantize = ir.Node("", "DequantizeLinear", [quantize.outputs[0], scale, zero], name=f"{name}_dequantize")
        dequantize.outputs[0].name = f"{name}_dequantized"
        for use in list(value.uses()):
            if id(use.node) in quantized_ids:
                use.node.replace_input_with(use.idx, dequantize.outputs[0])
        producer = value.producer()
        if producer is None:
            graph.insert_before(next(iter(graph)), [quantize, dequantize])
        else:
            graph.insert_after(producer, [quantize, dequantize])


def _quantize_weights(graph: ir.Graph, node: ir.Node, input_params: QuantParams, config: QuantizeInt8Config) -> None:
    weight = node.inputs[1]
    array = weight.const_value.numpy().astype(np.float32)
    axis = _channel_axis(node, array.ndim)
    q, scale, zero = quantize_weight(array, axis, config)
    base = node.name or weight.name
    q_value = add_initializer(graph, f"{base}_weight_quantized", q)
    scale_value = add_initializer(graph, f"{base}_weight_scale", scale)
    zero_value = add_initializer(graph, f"{base}_weight_zero_point", zero)
    attrs = [ir.AttrInt64("axis", axis)] if scale.ndim else []
    dq = ir.Node("", "DequantizeLinear", [q_value, scale_value, zero_value], attributes=attrs, name=f"{base}_weight_dq")
    graph.insert_before(node, dq)
    node.replace_input_with(1, dq.outputs[0])
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is None or bias.const_value is None or len(bias.const_value.shape) != 1:
        return
    bias_scale = (np.float32(input_params.scale) * scale).astype(np.float32)
    bias_q = np.clip(np.round(bias.const_value.numpy() / bias_scale), -(2**31), 2**31 - 1).astype(np.int32)
    if bias_scale.ndim == 0:
        bias_scale = np.full(bias_q.shape, bias_scale, dtype=np.float32)
    bq_value = add_initializer(graph, f"{base}_bias_quantized", bias_q)
    bs_value = add_initializer(graph, f"{base}_bias_scale", bias_scale)
    bz_value = add_initializer(graph, f"{base}_bias_zero_point", np.zeros(bias_q.shape, np.int32))
    bias_dq = ir.Node("", "DequantizeLinear", [bq_value, bs_value, bz_value], attributes=[ir.AttrInt64("axis", 0)],
                      name=f"{base}_bias_dq")  # fmt: skip
    graph.insert_before(node, bias_dq)
    node.replace_input_with(2, bias_dq.outputs[0])


def _channel_axis(node: ir.Node, ndim: int) -> int:
    """The output-channel axis of the weight: 0 for Conv and Gemm(transB=1), else the last."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm" and "transB" in node.attributes and node.attributes["transB"].as_int():
        return 0
    return ndim - 1
