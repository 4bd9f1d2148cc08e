"""What a Conv, ConvTranspose, Gemm or MatMul left in QDQ form becomes on the CPU: a float node on int8 weights.

The lowering rejects a node when no fused integer operator fits it (a
ConvTranspose, asymmetric weights, an activation its output range does not
absorb). It then keeps reading a dequantized input and feeding a
QuantizeLinear, and `run_in_float` prepares it for onnxruntime:

- its weight and bias become constants onnxruntime folds at load: it fuses and
  re-lays out only constant-weight convs, and ran a 1x1 conv at 112x112 with
  dequantized weights 3x slower than with constant ones;
- its input is dequantized per channel, so onnxruntime does not quantize those
  float weights again, per tensor (see `_dequantize_per_channel`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from compressor import ir as cir


def run_in_float(graph: ir.Graph, node: ir.Node) -> None:
    """Prepare ``node``, left in QDQ form, to run in float on the integers its weight and bias store."""
    _dequantize_per_channel(graph, node)
    fold_dequantized_constants(graph, node, {1: "weight", 2: "bias"})


def fold_dequantized_constants(graph: ir.Graph, node: ir.Node, roles: Mapping[int, str]) -> None:
    """Give ``node`` the dequantized constants it reads at the inputs ``roles`` names (input -> a name
    for the new initializers) as constants onnxruntime folds at load.

    With a zero zero point the integers stay stored as they are, behind
    ``Cast`` and ``Mul`` by the scale: onnxruntime's constant folding computes
    the float tensor when it builds the session (it never folds
    DequantizeLinear, whose QDQ fusions need to see it), and a Cast then Mul
    in float32 computes what DequantizeLinear does, to the bit. Otherwise the
    float tensor itself is stored.
    """
    names = cir.UniqueNames(graph)
    for index, role in roles.items():
        value = node.inputs[index] if len(node.inputs) > index else None
        producer = value.producer() if value is not None else None
        if producer is None or producer.op_type != "DequantizeLinear":
            continue
        q, scale, zero = (ir.convenience.get_const_tensor(v) if v is not None else None for v in producer.inputs[:3])
        if q is None or scale is None or zero is None:
            continue
        axis = producer.attributes["axis"].as_int() if "axis" in producer.attributes else 1
        shape = [1] * len(q.shape)
        if scale.numpy().ndim:
            shape[axis % len(q.shape)] = -1
        scale_array = scale.numpy().astype(np.float32).reshape(shape)
        if np.any(zero.numpy()):
            steps = (q.numpy().astype(np.int64) - zero.numpy().astype(np.int64).reshape(shape)).astype(np.float32)
            dequantized = cir.add_initializer(graph, f"{node.name}_{role}_dequantized", steps * scale_array, names)
        else:
            cast = ir.Node("", "Cast", [producer.inputs[0]], attributes=[ir.AttrInt64("to", int(ir.DataType.FLOAT))])
            broadcast_scale = cir.add_initializer(graph, f"{node.name}_{role}_step", scale_array, names)
            mul = ir.Node("", "Mul", [cast.outputs[0], broadcast_scale])
            graph.insert_before(node, [cast, mul])
            dequantized = mul.outputs[0]
        node.replace_input_with(index, dequantized)


def _dequantize_per_channel(graph: ir.Graph, node: ir.Node) -> None:
    """Give a float ``node`` that feeds a QuantizeLinear its own input DequantizeLinear, per channel.

    onnxruntime's WeightBiasQuantization rewrites a Conv, ConvTranspose or Gemm
    between a per-tensor DequantizeLinear and a QuantizeLinear: it quantizes the
    float weights `_fold_dequantized_constants` gives it again, per tensor, and so
    runs the node on coarser weights than ours (ResNet on Fashion-MNIST with
    asymmetric weights: 36.3 dB instead of 37.3). The same scale repeated for
    every channel is the same dequantization, and is outside that rewrite. A
    single-channel input has no such form and is left to it.
    """
    producer = node.inputs[0].producer() if node.inputs[0] is not None else None
    if node.op_type == "MatMul" or producer is None or producer.op_type != "DequantizeLinear":
        return
    channels = _input_channels(node)
    if channels is None or channels < 2 or not _feeds_quantize(node):
        return
    scale, zero = (ir.convenience.get_const_tensor(v) for v in producer.inputs[1:3])
    if scale is None or zero is None or scale.numpy().ndim:
        return
    names = cir.UniqueNames(graph)
    per_channel = [cir.add_initializer(graph, f"{node.name}_input_{role}", np.full(channels, t.numpy()), names)
                   for role, t in (("scale", scale), ("zero_point", zero))]  # fmt: skip
    axis = [ir.AttrInt64("axis", 1)]
    dequantize = ir.Node("", "DequantizeLinear", [producer.inputs[0], *per_channel], attributes=axis)
    graph.insert_before(node, dequantize)
    node.replace_input_with(0, dequantize.outputs[0])


def _input_channels(node: ir.Node) -> int | None:
    """Axis 1 of a Conv's, ConvTranspose's or Gemm's input, read off its int8 weight."""
    weight_dq = node.inputs[1].producer() if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if weight_dq is None or weight_dq.op_type != "DequantizeLinear":
        return None
    weight = ir.convenience.get_const_tensor(weight_dq.inputs[0])
    if weight is None or len(weight.shape) < 2:
        return None
    shape, attributes = weight.shape, node.attributes
    if node.op_type == "Conv":
        return shape[1] * (attributes["group"].as_int() if "group" in attributes else 1)
    if node.op_type == "Gemm" and "transB" in attributes and attributes["transB"].as_int():
        return shape[1]
    return shape[0]  # ConvTranspose's [C_in, C_out / group, k...], Gemm's [K, N]


def _feeds_quantize(node: ir.Node) -> bool:
    """Whether ``node``'s output reaches a QuantizeLinear through sole consumers (Relu/Clip allowed on the way)."""
    value = node.outputs[0]
    while len(value.uses()) == 1 and not value.is_graph_output():
        consumer = next(iter(value.uses())).node
        if consumer.op_type == "QuantizeLinear":
            return True
        if consumer.op_type not in ("Relu", "Clip"):
            return False
        value = consumer.outputs[0]
    return False
