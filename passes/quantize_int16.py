"""INT16 dynamic fixed point (Das et al. 2018): the pass.

Calibrates the activations of every node the plan (`compressor.quantization.int16`)
runs in DFP, then rewrites the model into int16 QDQ form with power-of-two
scales and zero point 0 (opset 21):
- each activation gets QuantizeLinear -> DequantizeLinear at ``2**e``, where ``e``
  is the smallest exponent that holds its calibrated magnitude (so it uses the full
  int16 range, and no requantization loses more than the one bit a power of two
  costs); outputs of Relu, MaxPool and data movement keep their input's exponent,
  so they stay exact;
- weights become int16 mantissas behind a DequantizeLinear, one exponent per output
  channel (``per_channel``) from max |w|; constant operands of Add/Mul/Concat one per tensor;
- biases become int32 at the accumulator's exponent (input + weight exponent), or a
  coarser one where a bias would not fit int32.

onnxruntime runs this form as is, emulating int16 in float; the integer reference
runs the same graph with integer arithmetic only and is its oracle.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import PassResult
from onnx_ir.passes.common import RemoveUnusedNodesPass

from compressor.errors import ModelError
from compressor.instruments import stage
from compressor.ir import UniqueNames, add_initializer, constant_array
from compressor.passes.upgrade_opset import default_opset
from compressor.pipeline import Pass, PassContext, Tolerance
from compressor.quantization import calibration, dfp
from compressor.quantization.int16 import WEIGHTED_OPS, Int16Plan, constant_inputs
from compressor.quantization.int16_config import QuantizeInt16Config

INT16_OPSET = 21  # int16 QuantizeLinear/DequantizeLinear
BIAS_LIMIT = 2**31 - 1


class QuantizeInt16(Pass):
    """Calibrate on the context's data and rewrite the model into INT16 DFP (int16 QDQ, power-of-two scales)."""

    name = "quantize_int16"
    needs = frozenset({"calibration"})
    tolerance = Tolerance(max_relative_error=None, min_sqnr_db=50.0)

    def __init__(
        self, config: QuantizeInt16Config | None = None, select: Callable[[], frozenset[str]] | None = None
    ) -> None:
        """``select``, when given, names the nodes to convert (asked when the pass runs), in a graph that
        may already be int8 QDQ: the int8 stage's int16 fallback for the nodes int8 left in float."""
        super().__init__()
        self.config = config or QuantizeInt16Config()
        self.select = select
        self.exponents: dict[str, int] = {}  # activation -> exponent
        self.skipped: dict[str, str] = {}  # node -> why it runs in float
        self.converted: list[str] = []  # nodes now in DFP

    def requires(self, model: ir.Model) -> None:
        quantized = sorted({n.op_type for n in model.graph if n.op_type in ("QuantizeLinear", "DequantizeLinear")})
        if quantized and self.select is None:
            raise ModelError(f"the model is already quantized (it has {', '.join(quantized)}); pass the float model")
        if default_opset(model) < INT16_OPSET:
            raise ModelError(f"int16 QDQ needs opset {INT16_OPSET}; run UpgradeOpset(min_opset={INT16_OPSET}) first")

    def call(self, model: ir.Model) -> PassResult:
        plan = Int16Plan.build(model.graph, self.config, self.select() if self.select is not None else None)
        self.skipped = plan.skipped
        self.converted = [node.name or node.op_type for node in plan.nodes]
        if not plan.nodes:
            return PassResult(model, False)
        context = PassContext.current()
        if context.calibration is None:
            raise ModelError("int16 quantization needs calibration data: pass --calib DATA.npz")
        magnitudes = self._calibrate(model, plan, context)
        exponents: dict[str, int] = {}
        for name in plan.tensors:
            if name in plan.shared:
                exponents[name] = exponents[plan.shared[name]]
            else:
                exponent = dfp.exponent_for(magnitudes[name], f"tensor {name!r}") + self.config.headroom_bits
                exponents[name] = int(exponent)
        self.exponents = exponents
        _Rewrite(model.graph, self.config, exponents).apply(plan)
        RemoveUnusedNodesPass()(model)  # drops the float weights the int16 ones replaced
        return PassResult(model, True)

    def _calibrate(self, model: ir.Model, plan: Int16Plan, context: PassContext) -> dict[str, float]:
        config = self.config
        observers = {
            name: calibration.make_observer(config.calibration, config.percentile, 2**16) for name in plan.observed()
        }
        batch_size = context.calibration.batch_size_for(calibration.BATCH_INPUT_ELEMENTS, config.batch_size)
        with stage("calibration", announce=False):
            calibration.collect(
                model, context.calibration, observers, num_samples=config.num_samples, batch_size=batch_size,
                progress=context.progress,
            )  # fmt: skip
        return {name: max(abs(low), abs(high)) for name, (low, high) in ((n, o.range()) for n, o in observers.items())}


class _Rewrite:
    """Inserts the Q/DQ pairs and writes int16 weights and int32 biases (one rewrite of one graph)."""

    def __init__(self, graph: ir.Graph, config: QuantizeInt16Config, exponents: dict[str, int]) -> None:
        self.graph, self.config, self.exponents = graph, config, exponents
        self.names = UniqueNames(graph)
        for node in graph:  # node names minted here must not clash with existing ones either (int8's Q/DQ)
            if node.name:
                self.names.fresh(node.name)
        self.scales: dict[tuple[int, str], tuple[ir.Value, ir.Value]] = {}
        self.weights: dict[int, tuple[ir.Value, np.ndarray]] = {}

    def apply(self, plan: Int16Plan) -> None:
        weighted = [(n, self.exponents[n.inputs[0].name]) for n in plan.nodes if n.op_type in WEIGHTED_OPS]
        converted = {id(node) for node in plan.nodes}
        for value in plan.tensors.values():
            self._quantize_activation(value, self.exponents[value.name], converted)
        for node, input_exponent in weighted:
            self._quantize_weighted(node, input_exponent)
        for node in plan.nodes:
            for index in constant_inputs(node):
                array = constant_array(node.inputs[index]).astype(np.float32)
                exponent = dfp.weight_exponents(array, None, f"constant {node.inputs[index].name!r}")
                node.replace_input_with(index, self._dequantized(node.inputs[index].name, array, exponent, None))

    def _scale_pair(self, exponent: int, dtype: str) -> tuple[ir.Value, ir.Value]:
        key = (exponent, dtype)
        if key not in self.scales:
            power = np.array(2.0**exponent, np.float32)
            scale = add_initializer(self.graph, f"dfp_scale_{exponent}", power, self.names)
            zero = add_initializer(self.graph, f"dfp_zero_{dtype}", np.zeros((), dtype), self.names)
            self.scales[key] = scale, zero
        return self.scales[key]

    def _quantize_activation(self, value: ir.Value, exponent: int, converted: set[int]) -> None:
        """Q/DQ ``value`` at ``2**exponent``. Every reader of a DFP node's output reads the DFP tensor (an int8
        QuantizeLinear after it requantizes it); another tensor is read through the pair by DFP nodes only."""
        scale, zero = self._scale_pair(exponent, "int16")
        name = value.name
        quantize = ir.Node("", "QuantizeLinear", [value, scale, zero], name=self.names.fresh(f"{name}_quantize"))
        quantize.outputs[0].name = self.names.fresh(f"{name}_int16")
        quantize.outputs[0].dtype = ir.DataType.INT16
        quantize.outputs[0].shape = value.shape
        dequantize = ir.Node(
            "", "DequantizeLinear", [quantize.outputs[0], scale, zero], name=self.names.fresh(f"{name}_dequantize")
        )
        result = dequantize.outputs[0]
        result.dtype, result.shape = ir.DataType.FLOAT, value.shape
        producer = value.producer()
        ours = producer is not None and id(producer) in converted
        for use in list(value.uses()):
            if use.node is not quantize and (ours or id(use.node) in converted):
                use.node.replace_input_with(use.idx, result)
        if value.is_graph_output() and ours:  # the graph output keeps its name and becomes the dequantized tensor
            index = next(i for i, v in enumerate(self.graph.outputs) if v is value)
            value.name = self.names.fresh(f"{name}_float")
            result.name = name
            self.graph.outputs[index] = result
        else:
            result.name = self.names.fresh(f"{name}_dfp")
        if producer is None:
            self.graph.insert_before(next(iter(self.graph)), [quantize, dequantize])
        else:
            self.graph.insert_after(producer, [quantize, dequantize])

    def _quantize_weighted(self, node: ir.Node, input_exponent: int) -> None:
        weight = node.inputs[1]
        array = constant_array(weight).astype(np.float32)
        axis = _weight_axis(node)
        if id(weight) not in self.weights:
            per = axis if self.config.per_channel else None
            exponents = dfp.weight_exponents(array, per, f"weight {weight.name!r}")
            self.weights[id(weight)] = (self._dequantized(weight.name, array, exponents, axis), exponents)
        dequantized, exponents = self.weights[id(weight)]
        node.replace_input_with(1, dequantized)
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is None:
            return
        values = constant_array(bias).astype(np.float64).reshape(-1)
        channels = array.shape[axis]
        accumulator = input_exponent + np.broadcast_to(exponents, (channels,))
        # Where a bias is too large for int32 at the accumulator's exponent, it takes a coarser one.
        needed = np.ceil(np.log2(np.maximum(np.abs(values), 1e-300) / BIAS_LIMIT)).astype(np.int64)
        chosen = np.maximum(accumulator, needed)
        mantissas = np.clip(np.rint(values / np.exp2(chosen)), -BIAS_LIMIT, BIAS_LIMIT).astype(np.int32)
        node.replace_input_with(2, self._stored(bias.name, mantissas, chosen, 0, "int32"))

    def _dequantized(self, name: str, array: np.ndarray, exponents: np.ndarray, axis: int | None) -> ir.Value:
        mantissas = dfp.to_mantissas(array, exponents, axis)
        return self._stored(name, mantissas, exponents, axis, "int16")

    def _stored(
        self, name: str, mantissas: np.ndarray, exponents: np.ndarray, axis: int | None, dtype: str
    ) -> ir.Value:
        """An integer initializer behind a DequantizeLinear at ``2**exponents`` (per ``axis`` when an array)."""
        data = add_initializer(self.graph, f"{name}_{dtype}", mantissas.astype(dtype), self.names)
        exponents = np.asarray(exponents)
        if exponents.ndim:
            scale = add_initializer(self.graph, f"{name}_scale", np.exp2(exponents).astype(np.float32), self.names)
        else:
            scale, _ = self._scale_pair(int(exponents), dtype)
        attributes = {"axis": ir.AttrInt64("axis", axis)} if exponents.ndim else {}
        output = self.names.fresh(f"{name}_dfp")
        # No zero point: DequantizeLinear's default is 0, and per-channel zeros would cost 2-4 bytes a channel.
        node = ir.Node("", "DequantizeLinear", [data, scale], attributes=attributes.values(), name=output)
        node.outputs[0].name = output
        node.outputs[0].dtype, node.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(mantissas.shape)
        self.graph.insert_before(next(iter(self.graph)), node)
        return node.outputs[0]


def _weight_axis(node: ir.Node) -> int:
    """The output-channel axis of a Conv, Gemm or MatMul weight."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans = node.attributes["transB"].as_int() if "transB" in node.attributes else 0
        return 0 if trans else 1
    return 1
