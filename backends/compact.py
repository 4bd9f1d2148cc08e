"""Trim a lowered model to what a deployment needs: no stale metadata, no restated defaults, short generated names.

On small networks the bytes around the weights decide the compression ratio:
a 0.4 MB Fashion-MNIST MobileNetV2 holds about 104 KB of int8 weights, scales and
biases, and its lowered file carried another 23 KB of shape annotations, the
exporter's description of parameters that no longer exist, attributes that
restate their defaults, and long generated tensor names. Nodes left in float
also carry the exporter's record of the Python code they came from. onnxruntime
reads none of it: it infers shapes itself and applies the same defaults.

Only values the quantizer created are renamed: integer tensors produced by
quantized operators, initializers that only quantized operators read, and
integer initializers with the quantizer's suffixes. A
user's own tensor names are never touched, and nor are graph inputs and outputs
or any name in a graph with subgraphs (which may read outer values by name).
"""

from __future__ import annotations

import onnx

QUANTIZED_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QGemm",
     "QLinearConcat", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu"}
)  # fmt: skip
# Longest first: "_weight_scale" must not be read as a plain "_scale".
SHORT_SUFFIXES = (
    ("_weight_zero_point", "_wz"),
    ("_weight_quantized", "_wq"),
    ("_weight_scale", "_ws"),
    ("_bias_quantized", "_bq"),
    ("_zero_point", "_zp"),
    ("_quantized", "_q"),
    ("_scale", "_s"),
)
# Written by torch.export: the signature of the exported program, naming parameters that passes fold away.
STALE_GRAPH_METADATA_PREFIXES = ("pkg.torch.export.",)
# Written on every node by torch.onnx's exporter and onnxscript's rewriter: the Python source of the node
# (module path, FX node, rewrite rule). About 0.5 KB a node, 10% of a 0.3 MB ShuffleNetV2; nothing reads it.
EXPORTER_NODE_METADATA_PREFIXES = ("namespace", "pkg.torch.onnx.", "pkg.onnxscript.")
INTEGER_TYPES = frozenset({onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT32})
WINDOW_OPS = frozenset({"Conv", "QLinearConv", "ConvInteger", "MaxPool", "AveragePool"})


def compact(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` trimmed in place (and returned): see the module docstring for what goes."""
    graph = model.graph
    graph.ClearField("value_info")
    stale = [p for p in graph.metadata_props if p.key.startswith(STALE_GRAPH_METADATA_PREFIXES)]
    for prop in stale:
        graph.metadata_props.remove(prop)
    for node in graph.node:
        _drop_exporter_metadata(node)
        if node.op_type in WINDOW_OPS:
            _drop_default_attributes(node)
    _shorten_generated_names(graph)
    return model


def _drop_exporter_metadata(node: onnx.NodeProto) -> None:
    provenance = [p for p in node.metadata_props if p.key.startswith(EXPORTER_NODE_METADATA_PREFIXES)]
    for prop in provenance:
        node.metadata_props.remove(prop)


def _drop_default_attributes(node: onnx.NodeProto) -> None:
    restated = [attr for attr in node.attribute if _is_default(attr)]
    for attr in restated:
        node.attribute.remove(attr)


def _is_default(attr: onnx.AttributeProto) -> bool:
    if attr.name == "auto_pad":
        return attr.s == b"NOTSET"
    if attr.name == "group":
        return attr.i == 1
    if attr.name in ("strides", "dilations"):
        return all(v == 1 for v in attr.ints)
    if attr.name == "pads":
        return all(v == 0 for v in attr.ints)
    return False


def _shorten_generated_names(graph: onnx.GraphProto) -> None:
    subgraph = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    if any(attr.type in subgraph for node in graph.node for attr in node.attribute):
        return  # subgraphs may read outer values by name
    readers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    generated = {t.name for t in graph.initializer if readers.get(t.name) and readers[t.name] <= QUANTIZED_OPS}
    # The quantizer refuses models that are already quantized, so integers named like its own are its own
    # (such as the int8 weight of a conv left in float, which a Cast widens at load).
    generated |= {t.name for t in graph.initializer if t.data_type in INTEGER_TYPES and short_name(t.name) != t.name}
    generated |= {
        name for node in graph.node if node.op_type in QUANTIZED_OPS - {"DequantizeLinear"} for name in node.output
    }
    generated -= {v.name for v in (*graph.input, *graph.output)}
    taken = set(readers) | {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    taken |= {v.name for v in (*graph.input, *graph.output)}
    renames = {}
    for name in sorted(generated):
        short = short_name(name)
        if short != name and short not in taken:
            renames[name] = short
            taken.add(short)
    if not renames:
        return
    for tensor in graph.initializer:
        tensor.name = renames.get(tensor.name, tensor.name)
    for node in graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        node.output[:] = [renames.get(name, name) for name in node.output]


def short_name(name: str) -> str:
    """The compact form of a generated name (``x_zero_point`` -> ``x_zp``); other names as they are."""
    for long, short in SHORT_SUFFIXES:
        if name.endswith(long):
            return name[: -len(long)] + short
    return name
