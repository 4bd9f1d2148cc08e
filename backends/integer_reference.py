"""The integer reference: a numpy interpreter of a quantized (QDQ) model, the oracle.

It runs the model the int16 pass writes (`compressor.passes.quantize_int16`): int16
QuantizeLinear/DequantizeLinear pairs with power-of-two scales and zero point 0
around each op; and the int8 pass's QDQ form (zero points, float32 scales), the
model the fused int8 lowering is built from, with int8 products in int32 and
requantization through a fixed-point multiplier. Where onnxruntime dequantizes to float and runs float kernels,
this runs what a 16-bit fixed-point target computes (`integer_kernels`): integer
products in chunked int32 accumulators, int64 sums, and one rounding (nearest,
ties to even, saturating) at each QuantizeLinear. It counts accumulator
overflows (chunk partial sums outside int32; zero when chunking is on) and
saturations.

An op with no integer kernel is an error naming the node: in the onnxruntime
lowering such ops run as float islands, which no integer target has.
Dispatch follows torch.fx's Interpreter: one method per op, errors re-raised
with the node they happened in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from compressor import ir as cir
from compressor.backends import integer_kernels as k
from compressor.backends.integer_kernels import Fixed, KernelError, Window
from compressor.errors import ModelError
from compressor.quantization import dfp

Value = Fixed | np.ndarray  # a real value in fixed point, or an integer tensor (quantized data, shapes)


@dataclass
class ReferenceStats:
    """Counts over every run so far: int32 accumulator overflows, int16 saturations, and each layer's reduction."""

    accumulator: dfp.AccumulatorStats = field(default_factory=dfp.AccumulatorStats)
    saturations: int = 0
    reductions: dict[str, tuple[int, int]] = field(default_factory=dict)  # node -> (reduction length, chunk length)

    @property
    def overflows(self) -> int:
        return self.accumulator.overflows


class IntegerReference:
    """Runs an int16 DFP model with integer arithmetic only; ``chunking=False`` accumulates whole reductions."""

    def __init__(self, model: onnx.ModelProto | ir.Model, chunking: bool = True) -> None:
        self.proto = cir.to_proto(model) if isinstance(model, ir.Model) else model
        self.chunking = chunking
        self.stats = ReferenceStats()
        self.constants: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in self.proto.graph.initializer}
        self._chunks: dict[str, int] = {}
        for node in self.proto.graph.node:
            if node.domain not in ("", "ai.onnx") or not hasattr(self, f"_{node.op_type}"):
                raise ModelError(
                    f"integer reference: node {node.name or node.output[0]!r} ({node.op_type}) has no integer kernel; "
                    "the onnxruntime lowering runs it as a float island, which no integer target has"
                )

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The model's outputs (float32, dequantized from integers) on ``feeds``."""
        env = self._execute(feeds, {})
        results = []
        for output in self.proto.graph.output:
            value = env[output.name]
            if not isinstance(value, Fixed):
                raise ModelError(f"integer reference: output {output.name!r} is not a dequantized DFP tensor")
            results.append(value.real().astype(np.float32))
        return results

    def step_differences(self, feeds: Mapping[str, np.ndarray], observed: Mapping[str, np.ndarray]) -> dict[str, int]:
        """Per integer tensor, the largest difference (in output steps) of ``observed`` from this reference
        when each op is given the observed inputs (another lowering's int16 tensors, by name).

        This checks a lowering op by op: end to end, one-step differences of an emulation in float
        propagate and grow through later layers, which says nothing about any single op.
        """
        differences: dict[str, int] = {}
        self._execute(feeds, observed, differences)
        return differences

    def _execute(
        self, feeds: Mapping[str, np.ndarray], forced: Mapping[str, np.ndarray], differences: dict | None = None
    ) -> dict[str, Value]:
        env: dict[str, Value] = dict(self.constants)
        env.update({name: np.asarray(array) for name, array in feeds.items()})
        for node in self.proto.graph.node:
            inputs = [env[name] if name else None for name in node.input]
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            try:
                outputs = getattr(self, f"_{node.op_type}")(node, inputs, attrs)
            except (KernelError, ValueError) as exc:
                raise ModelError(
                    f"integer reference: while executing {node.op_type} node {node.name or node.output[0]!r}: {exc}"
                ) from None
            for name, value in zip(node.output, outputs, strict=False):
                if name in forced and differences is not None and not isinstance(value, Fixed):
                    given = np.asarray(forced[name]).astype(np.int64)
                    differences[name] = int(np.abs(given - np.asarray(value, np.int64)).max(initial=0))
                    value = np.asarray(forced[name])
                env[name] = value
        return env

    # -- quantization boundaries ---------------------------------------------------------------------------------

    def _DequantizeLinear(self, node: onnx.NodeProto, inputs: list, attrs: dict) -> list[Value]:
        data, scale = inputs[0], inputs[1]
        zero = inputs[2] if len(inputs) > 2 and inputs[2] is not None else np.zeros((), data.dtype)
        multiplier, exponent = _scale_parts(scale)
        if exponent.ndim:
            shape = [1] * data.ndim
            shape[attrs.get("axis", 1) % data.ndim] = -1
            zero = np.broadcast_to(zero, np.shape(scale))
            multiplier, exponent, zero = (a.reshape(shape) for a in (multiplier, exponent, zero))
        return [Fixed.of(data.astype(np.int64) - zero.astype(np.int64), exponent, 1, multiplier)]

    def _QuantizeLinear(self, node: onnx.NodeProto, inputs: list, attrs: dict) -> list[Value]:
        value, scale = inputs[0], inputs[1]
        zero = inputs[2] if len(inputs) > 2 and inputs[2] is not None else np.zeros((), np.uint8)
        if np.asarray(scale).ndim:
            raise KernelError("per-axis QuantizeLinear of an activation")
        info = np.iinfo(zero.dtype)
        if not isinstance(value, Fixed):  # a float graph input: the one place real numbers enter
            rounded = np.rint(np.asarray(value, np.float32) / np.float32(scale)).astype(np.int64) + int(zero)
            self.stats.saturations += int(np.count_nonzero((rounded < info.min) | (rounded > info.max)))
            return [np.clip(rounded, info.min, info.max).astype(zero.dtype)]
        multiplier, exponent = _scale_parts(scale)
        quantized, clipped = k.requantize(value, exponent, zero.dtype.type, multiplier, int(zero))
        self.stats.saturations += clipped
        return [quantized]

    # -- arithmetic ----------------------------------------------------------------------------------------------

    def _Conv(self, node: onnx.NodeProto, inputs: list, attrs: dict) -> list[Value]:
        x, w = inputs[0], inputs[1]
        bias = inputs[2] if len(inputs) > 2 else None
        spatial = w.mantissas.ndim - 2
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise KernelError("auto_pad is not supported; the importer writes explicit pads")
        window = Window(
            tuple(w.mantissas.shape[2:]),
            tuple(attrs.get("strides", [1] * spatial)),
            tuple(attrs.get("pads", [0] * 2 * spatial)),
            tuple(attrs.get("dilations", [1] * spatial)),
        )
        groups = int(attrs.get("group", 1))
        per_group = w.mantissas.reshape(groups, w.mantissas.shape[0] // groups, -1).transpose(0, 2, 1)
        chunk = self._chunk(node, lambda: per_group.transpose(1, 0, 2).reshape(per_group.shape[1], -1))
        return [k.conv(x, w, bias, window, groups, chunk, self.stats.accumulator)]

    def _Gemm(self, node: onnx.NodeProto, inputs: list, attrs: dict) -> list[Value]:
        a, b = inputs[0], inputs[1]
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            raise KernelError("Gemm with transA or alpha/beta != 1")
        if attrs.get("transB", 0):
            b = Fixed(b.mantissas.T, b.exponent.T, b.divisor, b.multiplier.T)
        bias = inputs[2] if len(inputs) > 2 else None
        chunk = self._chunk(node, lambda: b.mantissas)
        return [k.matmul(a, b, bias, chunk, self.stats.accumulator)]

    def _MatMul(self, node: onnx.NodeProto, inputs: list, attrs: dict) -> list[Value]:
        a, b = inputs
        if b.mantissas.ndim != 2:
            raise KernelError("MatMul with a weight that is not 2-D")
        chunk = self._chunk(node, lambda: b.mantissas)
        return [k.matmul(a, b, None, chunk, self.stats.accumulator)]

    def _chunk(self, node: onnx.NodeProto, weights: Callable[[], np.ndarray]) -> int | None:
        """The node's chunk length (cached: its weights are constants), recorded with its reduction length."""
        name = node.name or node.output[0]
        if name not in self._chunks:
            matrix = weights()
            self._chunks[name] = dfp.chunk_length(matrix)
            self.stats.reductions[name] = (matrix.shape[0], self._chunks[name] if self.chunking else matrix.shape[0])
        return self._chunks[name] if self.chunking else None

    def _Add(self, node: onnx.NodeProto, inputs: list, attrs: dict) -> list[Value]:
        return [k.add(*inputs)]

    def _Sub(self, node: onnx.NodeProto, inputs: list, attrs: dict) -> list[Value]:
        return [k.add(*inputs, subtract=True)]

    def _Mul(self, node: onnx.NodeProto, inputs: list, attrs: dict) -> list[Value]:
        return [k.multiply(*inputs)]

    def _Relu(self, node: onnx.NodeProto, inputs: list, attrs: dict) -> list[Value]:
        return [k.relu(inputs[0])]

    def _Clip(self, node: onnx.NodeProto, inputs: list, attrs: dict) -> list[Value]:
        bounds = [inputs[i] if len(inputs) > i else None for i in (1, 2)]
        if "min" in attrs or "max" in attrs:  # opset < 11
            bounds = [np.float32(attrs[key]) if key in attrs else None for key in ("min", "max")]
        low, high = (None if b is None else b if isinstance(b, Fixed) else Fixed.from_float(b) for b in bounds)
        return [k.clip(inputs[0], low, high)]

    def _MaxPool(self, node: onnx.NodeProto, inputs: list, attrs: dict) -> list[Value]:
        if attrs.get("ceil_mode", 0) or (len(node.output) > 1 and node.output[1]):
            raise KernelError("MaxPool with ceil_mode or indices")
        return [k.max_pool(inputs[0], _window(attrs, inputs[0].mantissas.ndim - 2))]

    def _AveragePool(self, node: onnx.NodeProto, inputs: list, attrs: dict) -> list[Value]:
        if attrs.get("ceil_mode", 0):
            raise KernelError("AveragePool with ceil_mode")
        window = _window(attrs, inputs[0].mantissas.ndim - 2)
        return [k.average_pool(inputs[0], window, bool(attrs.get("count_include_pad", 0)))]

    def _GlobalAveragePool(self, node: onnx.NodeProto, inputs: list, attrs: dict) -> list[Value]:
        return [k.global_average_pool(inputs[0])]

    def _Concat(self, node: onnx.NodeProto, inputs: list, attrs: dict) -> list[Value]:
        if all(not isinstance(v, Fixed) for v in inputs):
            return [np.concatenate(inputs, axis=attrs["axis"])]
        return [k.concat(inputs, attrs["axis"])]

    # -- data movement (on mantissas; exponent and divisor unchanged) ---------------------------------------------

    def _Reshape(self, node: onnx.NodeProto, inputs: list, attrs: dict) -> list[Value]:
        x, shape = inputs
        dims = [int(d) for d in shape]
        if not attrs.get("allowzero", 0):
            dims = [x.mantissas.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return [_move(x, lambda m: m.reshape(dims))]

    def _Flatten(self, node: onnx.NodeProto, inputs: list, attrs: dict) -> list[Value]:
        axis = attrs.get("axis", 1)
        return [_move(inputs[0], lambda m: m.reshape(int(np.prod(m.shape[:axis])), -1))]

    def _Transpose(self, node: onnx.NodeProto, inputs: list, attrs: dict) -> list[Value]:
        return [_move(inputs[0], lambda m: m.transpose(attrs.get("perm")))]

    def _Squeeze(self, node: onnx.NodeProto, inputs: list, attrs: dict) -> list[Value]:
        axes = _axes(inputs, attrs)
        return [_move(inputs[0], lambda m: np.squeeze(m, axis=axes))]

    def _Unsqueeze(self, node: onnx.NodeProto, inputs: list, attrs: dict) -> list[Value]:
        axes = _axes(inputs, attrs)
        return [_move(inputs[0], lambda m: np.expand_dims(m, sorted(a % (m.ndim + len(axes)) for a in axes)))]

    def _Identity(self, node: onnx.NodeProto, inputs: list, attrs: dict) -> list[Value]:
        return [inputs[0]]

    def _Split(self, node: onnx.NodeProto, inputs: list, attrs: dict) -> list[Value]:
        x, axis = inputs[0], attrs.get("axis", 0)
        size = x.mantissas.shape[axis] if isinstance(x, Fixed) else x.shape[axis]
        sizes = inputs[1] if len(inputs) > 1 and inputs[1] is not None else attrs.get("split")
        if sizes is None:
            parts = attrs.get("num_outputs", len(node.output))
            step = -(-size // parts)
            sizes = [min(step, size - i * step) for i in range(parts)]
        cuts = np.cumsum(sizes)[:-1]
        return [_move(x, lambda m, i=i: np.split(m, cuts, axis=axis)[i]) for i in range(len(sizes))]

    def _Constant(self, node: onnx.NodeProto, inputs: list, attrs: dict) -> list[Value]:
        if "value" not in attrs:
            raise KernelError("Constant without a tensor value")
        return [numpy_helper.to_array(attrs["value"])]


def _scale_parts(scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A float32 scale exactly as ``multiplier * 2**exponent``, the multiplier odd (1 for a power of two)."""
    scale = np.asarray(scale, np.float32)
    if np.any(~np.isfinite(scale)) or np.any(scale <= 0):
        raise KernelError(f"scale {scale.flat[0]} is not a positive finite number")
    fraction, exponent = np.frexp(scale.astype(np.float64))
    multiplier = np.rint(fraction * 2**24).astype(np.int64)
    exponent = exponent.astype(np.int64) - 24
    trailing = np.log2(multiplier & -multiplier).astype(np.int64)  # strip the significand's trailing zeros
    return multiplier >> trailing, exponent + trailing


def _window(attrs: Mapping[str, object], spatial: int) -> Window:
    kernel = tuple(attrs["kernel_shape"])
    return Window(
        kernel,
        tuple(attrs.get("strides", [1] * spatial)),
        tuple(attrs.get("pads", [0] * 2 * spatial)),
        tuple(attrs.get("dilations", [1] * spatial)),
    )


def _axes(inputs: list, attrs: Mapping[str, object]) -> tuple[int, ...]:
    given = inputs[1] if len(inputs) > 1 and inputs[1] is not None else attrs.get("axes")
    return tuple(int(a) for a in given) if given is not None else ()


def _move(value: Value, move: Callable[[np.ndarray], np.ndarray]) -> Value:
    return value.map(move) if isinstance(value, Fixed) else move(value)
