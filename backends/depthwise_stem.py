"""Single-channel stems (grayscale images, spectrograms) run as depthwise convs on a tiled input.

A QLinearConv from 1 input channel to M outputs reduces over only kh*kw values,
and MLAS's int8 conv kernels waste most of their width there: a 1->32 3x3 stem
at 28x28 takes 52-57 us on an AVX-512/AMX Xeon, twice the fp32 conv. The same
conv is a depthwise conv (group M) on the input tiled M times along the
channels: the weights [M, 1, kh, kw] already have that layout, every product is
the same, and MLAS's depthwise kernel runs it in 24-32 us plus 5 us for the
Tile, on each of the five Fashion-MNIST stems measured.

Runs on the fused integer graph, after `compressor.backends.qlinear.lower_to_qlinear`.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from compressor import ir as cir

WEIGHT_INPUT = 3  # QLinearConv: x, x_scale, x_zero_point, w, ...


def depthwise_stems(graph: ir.Graph) -> list[str]:
    """Rewrite every single-input-channel QLinearConv in ``graph`` in place; return their names."""
    names = cir.UniqueNames(graph)
    rewritten = []
    for node in list(graph):
        out_channels = _single_channel_outputs(node)
        if out_channels is None:
            continue
        repeats = cir.add_initializer(graph, f"{node.name}_tile_repeats", np.array([1, out_channels, 1, 1]), names)
        tile = ir.Node("", "Tile", [node.inputs[0], repeats], name=f"{node.name}_tile")
        tile.outputs[0].name = names.fresh(f"{node.name}_tiled")
        graph.insert_before(node, tile)
        node.replace_input_with(0, tile.outputs[0])
        node.attributes["group"] = ir.AttrInt64("group", out_channels)
        rewritten.append(node.name)
    return rewritten


def _single_channel_outputs(node: ir.Node) -> int | None:
    """M for a 2-D QLinearConv from one input channel to M > 1 outputs (group 1), else None."""
    if node.op_type != "QLinearConv" or node.domain not in ("", "ai.onnx"):
        return None
    weight = node.inputs[WEIGHT_INPUT].const_value if len(node.inputs) > WEIGHT_INPUT else None
    group = node.attributes["group"].as_int() if "group" in node.attributes else 1
    if weight is None or len(weight.shape) != 4 or group != 1:
        return None
    out_channels, in_channels = weight.shape[0], weight.shape[1]
    return int(out_channels) if in_channels == 1 and out_channels > 1 else None
