"""Stride-2 stems with few input channels, rewritten as a stride-1 conv on a space-to-depth input.

A ResNet stem (7x7, stride 2, 3 input channels) reduces over only 147 values
per output, and MLAS's int8 conv kernels are slow there: on an AVX-512/AMX
Xeon it is no faster than fp32 (0.91 ms of ResNet-18's 5 ms in int8). The same
conv on its input folded 2x2 into 12 channels (a 4x4 kernel, stride 1, the
kernel zero-padded to 8x8 first) is exact and takes 0.44 ms there.

The rewrite is done in QDQ form before the integer lowering:
``x -> Q -> DQ -> Conv`` becomes ``x -> Q -> SpaceToDepth -> DQ -> Conv'``.
SpaceToDepth moves the quantized (uint8) input, and the conv pads the folded
input with its zero point, so every integer product is one the original conv
computes, or a product with a zero weight. An odd front pad (ResNet's 3) moves
the kernel one zero row down instead. Only an input of odd height or width needs
a Pad (with the zero point) before the fold; in ResNet-18 that Pad cost 1.3% of
the int8 model's time.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from compressor import ir as cir

BLOCK = 2
MAX_INPUT_CHANNELS = 4  # beyond this the int8 kernels are already efficient


def space_to_depth_stems(graph: ir.Graph) -> list[str]:
    """Rewrite every eligible stem conv in ``graph`` in place; return their names."""
    names = cir.UniqueNames(graph)
    rewritten = []
    for node in list(graph):
        if (
            node.op_type == "Conv"
            and node.domain in ("", "ai.onnx")
            and _eligible(node)
            and _rewrite(graph, node, names)
        ):
            rewritten.append(node.name)
    return rewritten


def _attr(node: ir.Node, name: str, default: list[int]) -> list[int]:
    attr = node.attributes.get(name)
    return list(attr.as_ints()) if attr is not None else default


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type else None


def _sole_use(value: ir.Value) -> bool:
    return len(value.uses()) == 1 and not value.is_graph_output()


def _eligible(conv: ir.Node) -> bool:
    dequantize = _producer(conv.inputs[0], "DequantizeLinear")
    quantize = _producer(dequantize.inputs[0], "QuantizeLinear") if dequantize else None
    weight = _producer(conv.inputs[1], "DequantizeLinear")
    if quantize is None or weight is None or weight.inputs[0].const_value is None:
        return False
    if weight.inputs[0].dtype == ir.DataType.INT16:
        return False  # INT16 DFP (int8's int16 fallback) runs in QDQ form: no integer conv to feed
    if not all(_sole_use(value) for value in (conv.inputs[0], dequantize.inputs[0], conv.inputs[1])):
        return False
    shape = quantize.inputs[0].shape
    kernel = weight.inputs[0].const_value.shape
    auto_pad = conv.attributes.get("auto_pad")
    return (
        shape is not None
        and len(shape) == 4
        and all(isinstance(d, int) for d in shape[2:])
        and len(kernel) == 4
        and kernel[1] <= MAX_INPUT_CHANNELS
        and min(kernel[2:]) > 1
        and _attr(conv, "strides", [1, 1]) == [BLOCK, BLOCK]
        and _attr(conv, "dilations", [1, 1]) == [1, 1]
        and conv.attributes.get_int("group", 1) == 1
        and (auto_pad is None or auto_pad.as_string() == "NOTSET")
        and (quantize.inputs[1].const_value is not None and quantize.inputs[1].const_value.size == 1)
    )


def _rewrite(graph: ir.Graph, conv: ir.Node, names: cir.UniqueNames) -> bool:
    dequantize = conv.inputs[0].producer()
    quantize = dequantize.inputs[0].producer()
    weight = conv.inputs[1].producer()
    source = quantize.inputs[0]
    sizes = source.shape[2], source.shape[3]
    pads = _attr(conv, "pads", [0, 0, 0, 0])
    kernel = weight.inputs[0].const_value.shape[2:]

    # An odd front pad becomes an even one, and the kernel one zero row longer in front, so that
    # blocks of the padded input line up with the input's own blocks.
    shifts = [begin % BLOCK for begin in pads[:2]]
    folded_kernel = [-(-(k + shift) // BLOCK) for k, shift in zip(kernel, shifts, strict=True)]
    outputs = [
        (size + begin + end - k) // BLOCK + 1
        for size, begin, end, k in zip(sizes, pads[:2], pads[2:], kernel, strict=True)
    ]
    fronts = [begin + shift for begin, shift in zip(pads[:2], shifts, strict=True)]
    ends = [
        BLOCK * (out + k - 1) - size - front
        for out, k, size, front in zip(outputs, folded_kernel, sizes, fronts, strict=True)
    ]
    if min(ends) < 0:
        return False

    folded_input = quantize.outputs[0]
    if all(size % BLOCK == 0 for size in sizes):  # the conv pads the folded input itself, with the zero point
        conv_pads = [amount // BLOCK for amount in (*fronts, *ends)]
    else:
        folded_input = _pad(graph, conv, quantize, [0, 0, *fronts, 0, 0, *ends], names)
        conv_pads = [0, 0, 0, 0]
    fold = ir.Node(
        "",
        "SpaceToDepth",
        [folded_input],
        attributes=[ir.AttrInt64("blocksize", BLOCK)],
        name=names.fresh(f"{conv.name}_s2d"),
    )
    fold.outputs[0].name = names.fresh(f"{conv.name}_s2d_fold")
    fold.outputs[0].type = quantize.outputs[0].type
    graph.insert_before(dequantize, fold)
    dequantize.replace_input_with(0, fold.outputs[0])
    dequantize.outputs[0].shape = None

    folded = _fold_weights(weight.inputs[0].const_value.numpy(), folded_kernel, shifts)
    weight.replace_input_with(0, cir.add_initializer(graph, f"{conv.name}_s2d_weight", folded, names))
    conv.attributes["strides"] = ir.AttrInt64s("strides", [1, 1])
    conv.attributes["pads"] = ir.AttrInt64s("pads", conv_pads)
    if "kernel_shape" in conv.attributes:
        conv.attributes["kernel_shape"] = ir.AttrInt64s("kernel_shape", folded_kernel)
    return True


def _pad(graph: ir.Graph, conv: ir.Node, quantize: ir.Node, amounts: list[int], names: cir.UniqueNames) -> ir.Value:
    """The quantized input padded by ``amounts`` (ONNX Pad order) with its zero point."""
    pad_amounts = cir.add_initializer(graph, f"{conv.name}_s2d_pads", np.array(amounts, np.int64), names)
    zero_point = quantize.inputs[2] if len(quantize.inputs) > 2 else None  # absent: 0, Pad's default too
    pad = ir.Node("", "Pad", [quantize.outputs[0], pad_amounts, zero_point], name=names.fresh(f"{conv.name}_s2d_pad"))
    pad.outputs[0].name = names.fresh(f"{conv.name}_s2d_pad")
    pad.outputs[0].type = quantize.outputs[0].type
    graph.insert_after(quantize, pad)
    return pad.outputs[0]


def _fold_weights(weights: np.ndarray, folded_kernel: list[int], shifts: list[int]) -> np.ndarray:
    """[O, C, kh, kw] -> [O, 4C, kh', kw'] in SpaceToDepth's channel order ((r * 2 + s) * C + c).

    The kernel sits ``shifts`` rows and columns into a zero kernel of twice the folded size.
    """
    out_channels, in_channels, kh, kw = weights.shape
    padded = np.zeros((out_channels, in_channels, BLOCK * folded_kernel[0], BLOCK * folded_kernel[1]), weights.dtype)
    padded[:, :, shifts[0] : shifts[0] + kh, shifts[1] : shifts[1] + kw] = weights
    blocks = padded.reshape(out_channels, in_channels, folded_kernel[0], BLOCK, folded_kernel[1], BLOCK)
    return np.ascontiguousarray(blocks.transpose(0, 3, 5, 1, 2, 4)).reshape(
        out_channels, BLOCK * BLOCK * in_channels, *folded_kernel
    )
