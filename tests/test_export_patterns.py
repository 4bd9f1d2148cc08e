"""int8 on graph patterns exporters produce beyond the zoo: ops with no int8 form, Linear biases on tokens,
shape arithmetic, fixed batch dimensions. Each checks numerics against onnxruntime's fp32 run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from conftest import conv_bn_model, float_model, random_input
from onnx import helper
from test_quantize_int8 import BASE, imported, logits, quantize

from compressor import compress
from compressor.backends import get_backend
from compressor.metrics import sqnr_db


def test_ops_with_no_int8_form_read_the_integer_output_dequantized(small_calib: Path) -> None:
    """conv_a -> HardSwish -> conv_b, and Shape(conv_a): conv_a still runs as a QLinearConv."""
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.uniform(-0.5, 0.5, shape).astype(np.float32), name)
             for name, shape in (("wa", (8, 3, 3, 3)), ("wb", (8, 8, 3, 3)))]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["input", "wa"], ["a"], name="conv_a", pads=[1] * 4),
        helper.make_node("HardSwish", ["a"], ["h"], name="hardswish"),
        helper.make_node("Shape", ["a"], ["a_shape"], name="shape"),
        helper.make_node("Conv", ["h", "wb"], ["b"], name="conv_b", pads=[1] * 4),
        helper.make_node("Reshape", ["b", "a_shape"], ["out"], name="reshape"),
    ]
    proto = float_model("hardswish", nodes, inits, (["N", 3, 8, 8], ["N", 8, 8, 8]), names=("input", "out"))
    model = imported(proto)
    quantizer = quantize(model, small_calib)
    assert quantizer.skipped == {"hardswish": "HardSwish has no int8 form here: runs in float"}
    readers = {n.name: n.inputs[0].producer().op_type for n in model.graph if n.name in ("hardswish", "shape")}
    assert readers == {"hardswish": "DequantizeLinear", "shape": "DequantizeLinear"}
    backend = get_backend("cpu")
    lowered = backend.lower(model)
    assert "conv_a" not in backend.rejected
    assert next(n for n in lowered.graph.node if n.name == "conv_a").op_type == "QLinearConv"
    x = random_input((16, 3, 8, 8), seed=2)
    reference, qdq = logits(proto, x), logits(model, x)
    assert sqnr_db(reference, qdq) > 25
    assert sqnr_db(qdq, logits(lowered, x)) > 40
    kept = imported(proto)
    quantize(kept, small_calib, replace(BASE, keep_float=frozenset({"hardswish"})))
    assert next(n for n in kept.graph if n.name == "hardswish").inputs[0].name == "a", "kept float: reads conv_a as is"


def test_linear_bias_added_after_matmul_runs_on_integers(tmp_path: Path) -> None:
    """torch exports Linear on tokens [N, T, K] as MatMul then Add(bias): the bias is quantized like an activation."""
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.uniform(-0.5, 0.5, shape).astype(np.float32), name)
             for name, shape in (("w1", (16, 32)), ("b1", (32,)), ("w2", (32, 8)))]  # fmt: skip
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["m1"], name="fc1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="fc1_bias"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu"),
        helper.make_node("MatMul", ["r1", "w2"], ["output"], name="fc2"),
    ]
    proto = float_model("tokens", nodes, inits, (["N", 6, 16], ["N", 6, 8]))
    np.savez(tmp_path / "calib.npz", x=random_input((32, 6, 16), seed=1))
    model = imported(proto)
    quantize(model, tmp_path / "calib.npz")
    lowered = get_backend("cpu").lower(model)
    ops = {n.name: n.op_type for n in lowered.graph.node}
    assert (ops["fc1"], ops["fc1_bias"]) == ("QLinearMatMul", "QLinearAdd")
    x = random_input((8, 6, 16), seed=2)
    qdq = logits(model, x)
    assert sqnr_db(logits(proto, x), qdq) > 25
    assert sqnr_db(qdq, logits(lowered, x)) > 40


def test_shape_arithmetic_is_neither_quantized_nor_reported(small_calib: Path) -> None:
    """A torch-style flatten computes its target shape with int64 Concat/Unsqueeze: not float work."""
    proto = conv_bn_model(identity=False)
    nodes = list(proto.graph.node)
    at = next(i for i, n in enumerate(nodes) if n.op_type == "Flatten")
    source, target = nodes[at].input[0], nodes[at].output[0]
    proto.graph.initializer.extend([onnx.numpy_helper.from_array(np.array(v, np.int64), n)
                                    for n, v in (("zero", [0]), ("rest", [-1]))])  # fmt: skip
    nodes[at : at + 1] = [
        helper.make_node("Shape", [source], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], name="batch", axis=0),
        helper.make_node("Concat", ["batch", "rest"], ["dims"], name="dims", axis=0),
        helper.make_node("Reshape", [source, "dims"], [target], name="flatten"),
    ]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    model = imported(onnx.shape_inference.infer_shapes(proto))
    x = random_input((16, 3, 8, 8), seed=2)
    reference = logits(model, x)
    quantizer = quantize(model, small_calib)
    assert quantizer.skipped == {}
    flattened = imported(conv_bn_model(identity=False))
    quantize(flattened, small_calib)
    lowered = logits(get_backend("cpu").lower(model), x)
    np.testing.assert_allclose(lowered, logits(get_backend("cpu").lower(flattened), x), rtol=1e-6, atol=1e-6)
    assert sqnr_db(reference, lowered) > 20


def test_model_with_a_fixed_batch_of_one_compresses(tmp_path: Path, small_calib: Path) -> None:
    """torch.onnx.export without dynamic axes fixes the batch at the example's size; every run then takes one sample."""
    proto = conv_bn_model()
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    source = tmp_path / "fixed.onnx"
    onnx.save(proto, source)
    result = compress(source, target="int8", calib=small_calib, latency_guard=False)
    x = random_input((1, 3, 8, 8), seed=3)
    assert sqnr_db(logits(proto, x), logits(result.lowered, x)) > 20
    assert result.report.evaluation["samples"] == 32  # the report ran every calibration sample, one at a time
