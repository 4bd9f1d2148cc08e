"""Weight-only int8 for chosen float nodes: int8 weights per output channel, float activations, the rest untouched."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from conftest import random_input, run_onnx
from onnx import TensorProto, helper, numpy_helper

from compressor import ir as cir
from compressor.metrics import sqnr_db
from compressor.passes.store_weights_int8 import StoreWeightsInt8, StoreWeightsInt8Config


def conv_gemm_model() -> onnx.ModelProto:
    """conv_a -> conv_b -> Flatten -> Gemm(transB) -> MatMul by a non-constant weight (a second input)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "wa"),
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 8, 3, 3)).astype(np.float32), "wb"),
        numpy_helper.from_array(rng.normal(0, 0.1, (10, 4 * 6 * 6)).astype(np.float32), "wg"),
        numpy_helper.from_array(rng.normal(0, 0.1, 10).astype(np.float32), "bg"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "wb"], ["b"], name="conv_b"),
        helper.make_node("Flatten", ["b"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["g"], name="gemm", transB=1),
        helper.make_node("MatMul", ["g", "mix"], ["output"], name="mix"),
    ]
    graph = helper.make_graph(
        nodes, "conv_gemm",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8]),
         helper.make_tensor_value_info("mix", TensorProto.FLOAT, [10, 10])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 10])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_listed_nodes_get_int8_weights_per_output_channel() -> None:
    proto = conv_gemm_model()
    model = ir.serde.deserialize_model(proto)
    store = StoreWeightsInt8(StoreWeightsInt8Config(frozenset({"conv_a", "gemm", "mix"})))
    assert store(model).modified
    assert store.stored == ["conv_a", "gemm"], "mix reads a non-constant weight"
    dequantize = {n.outputs[0].name: n for n in model.graph if n.op_type == "DequantizeLinear"}
    nodes = {n.name: n for n in model.graph}
    for name, channels in (("conv_a", 8), ("gemm", 10)):
        dq = dequantize[nodes[name].inputs[1].name]
        assert dq.inputs[0].dtype == ir.DataType.INT8 and dq.inputs[1].const_value.shape == (channels,)
        assert dq.attributes["axis"].as_int() == 0
    assert nodes["conv_b"].inputs[1].name == "wb", "a node not listed keeps its float weight"
    assert nodes["gemm"].inputs[2].name == "bg", "biases stay float"
    assert {"wa", "wg"}.isdisjoint(model.graph.initializers), "the replaced float weights are gone"
    feeds = {"input": random_input((16, 3, 8, 8), seed=2), "mix": np.eye(10, dtype=np.float32)}
    expected = run_onnx(proto, feeds)[0]
    assert sqnr_db(expected, run_onnx(cir.to_proto(model), feeds)[0]) > 38.0  # 8-bit weights only: measured 41.6 dB


def test_nothing_listed_changes_nothing() -> None:
    model = ir.serde.deserialize_model(conv_gemm_model())
    assert not StoreWeightsInt8()(model).modified
    assert not any(n.op_type == "DequantizeLinear" for n in model.graph)
