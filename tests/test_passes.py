"""Each import pass: structure on a hand-built graph, numerics vs onnxruntime, no-op, bad input."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import DEMO_ONNX, assert_close, conv_bn_model, random_input, run_onnx
from onnx import TensorProto, helper

from compressor import ir as cir
from compressor.errors import ModelError
from compressor.passes import Cleanup, FoldBatchNorm, FoldConstants, InferShapes, UpgradeOpset, import_passes
from compressor.passes.upgrade_opset import default_opset
from compressor.pipeline import PassContext, Pipeline


def ops(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def feeds(batch: int = 4) -> dict[str, np.ndarray]:
    return {"input": random_input((batch, 3, 8, 8))}


class TestFoldBatchNorm:
    def test_folds_both_convs_and_keeps_outputs(self) -> None:
        proto = conv_bn_model(identity=False)
        model = ir.serde.deserialize_model(proto)
        result = FoldBatchNorm()(model)
        assert result.modified
        assert "BatchNormalization" not in ops(model)
        assert ops(model).count("Conv") == 2
        # the bias-less second Conv gained a bias
        assert all(len(node.inputs) == 3 for node in model.graph if node.op_type == "Conv")
        assert_close(run_onnx(proto, feeds()), run_onnx(model, feeds()), rtol=1e-5)

    def test_no_batchnorm_is_a_no_op(self) -> None:
        model = ir.serde.deserialize_model(conv_bn_model(identity=False))
        FoldBatchNorm()(model)
        assert FoldBatchNorm()(model).modified is False

    def test_shared_conv_output_is_not_folded(self) -> None:
        proto = conv_bn_model(identity=False)
        # a second consumer of conv1's output makes folding illegal
        proto.graph.node.append(helper.make_node("Relu", ["c1"], ["side"], name="side"))
        proto.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
        model = ir.serde.deserialize_model(proto)
        fold = FoldBatchNorm()
        fold(model)
        assert ops(model).count("BatchNormalization") == 1
        assert any("other users" in reason for reason in fold.rejections)
        assert_close(run_onnx(proto, feeds()), run_onnx(model, feeds()))

    def test_non_constant_weight_is_rejected_with_reason(self) -> None:
        proto = conv_bn_model(identity=False)
        # make w1 a graph input: the weight is no longer constant
        w1 = next(t for t in proto.graph.initializer if t.name == "w1")
        proto.graph.initializer.remove(w1)
        proto.graph.input.append(helper.make_tensor_value_info("w1", TensorProto.FLOAT, [8, 3, 3, 3]))
        model = ir.serde.deserialize_model(proto)
        fold = FoldBatchNorm()
        fold(model)
        assert "weight of Conv is not constant" in " ".join(fold.rejections)
        assert ops(model).count("BatchNormalization") == 1

    def test_demo_model_numerics(self) -> None:
        if not DEMO_ONNX.exists():
            pytest.skip("demo model not built yet")
        model = cir.load_model(DEMO_ONNX)
        FoldBatchNorm()(model)
        x = {"input": np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32)}
        assert_close(run_onnx(DEMO_ONNX, x), run_onnx(model, x))


class TestCleanup:
    def test_removes_identity_and_dead_nodes(self) -> None:
        proto = conv_bn_model(identity=True)
        proto.graph.node.append(helper.make_node("Relu", ["c1"], ["dead"], name="dead"))
        model = ir.serde.deserialize_model(proto)
        assert Cleanup()(model).modified
        assert "Identity" not in ops(model)
        assert "dead" not in [node.name for node in model.graph]
        assert_close(run_onnx(proto, feeds()), run_onnx(model, feeds()), rtol=0.0)

    def test_clean_graph_is_a_no_op(self) -> None:
        model = ir.serde.deserialize_model(conv_bn_model(identity=False))
        assert Cleanup()(model).modified is False


class TestUpgradeOpset:
    def test_upgrades_old_model_to_13(self) -> None:
        proto = conv_bn_model(opset=11, identity=False)
        model = ir.serde.deserialize_model(proto)
        assert UpgradeOpset()(model).modified
        assert default_opset(model) == 13
        assert_close(run_onnx(proto, feeds()), run_onnx(model, feeds()))

    def test_recent_opset_is_a_no_op(self) -> None:
        model = ir.serde.deserialize_model(conv_bn_model(opset=17))
        assert UpgradeOpset()(model).modified is False
        assert default_opset(model) == 17

    def test_unconvertible_model_is_a_clear_error(self) -> None:
        # ATen is an experimental op with no schema to convert: the converter asserts.
        graph = helper.make_graph(
            [helper.make_node("ATen", ["input"], ["out"])],
            "old",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, [4])],
            [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4])],
        )
        model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)]))
        with pytest.raises(ModelError, match="cannot upgrade the model from opset 9 to 13"):
            UpgradeOpset()(model)


class TestFoldConstants:
    @staticmethod
    def graph(nodes: list[onnx.NodeProto]) -> ir.Model:
        graph = helper.make_graph(
            nodes,
            "consts",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
            [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])],
            [onnx.numpy_helper.from_array(np.arange(4, dtype=np.float32), "w")],
        )
        return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))

    def test_folds_computed_constants(self) -> None:
        model = self.graph(
            [
                helper.make_node("Shape", ["w"], ["w_shape"]),
                helper.make_node("Constant", [], ["two"], value_float=2.0),
                helper.make_node("CastLike", ["two", "input"], ["two_like"]),
                helper.make_node("Expand", ["two_like", "w_shape"], ["twos"]),
                helper.make_node("Mul", ["input", "twos"], ["out"]),
            ]
        )
        x = {"input": random_input((3, 4))}
        before = run_onnx(model, x)
        assert FoldConstants()(model).modified
        Cleanup()(model)
        assert ops(model) == ["Mul"]
        assert_close(before, run_onnx(model, x), rtol=0.0)

    def test_random_ops_and_graph_inputs_are_left_alone(self) -> None:
        model = self.graph(
            [
                helper.make_node("RandomNormal", [], ["noise"], shape=[4]),
                helper.make_node("Add", ["input", "noise"], ["noisy"]),
                helper.make_node("Mul", ["noisy", "w"], ["out"]),
            ]
        )
        assert FoldConstants()(model).modified is False
        assert ops(model) == ["RandomNormal", "Add", "Mul"]


class TestInferShapes:
    def test_annotates_intermediate_values(self) -> None:
        model = ir.serde.deserialize_model(conv_bn_model(identity=False))
        assert InferShapes()(model).modified
        relu = next(node for node in model.graph if node.op_type == "Relu")
        assert relu.outputs[0].shape is not None
        assert list(relu.outputs[0].shape)[1:] == [8, 8, 8]


def test_import_pipeline_on_old_identity_bn_model_matches_onnxruntime() -> None:
    proto = conv_bn_model(opset=11, identity=True)
    model = ir.serde.deserialize_model(proto)
    records = Pipeline(import_passes()).run(model, PassContext())
    names = [r.name for r in records]
    assert names == [
        "weights_as_inputs",
        "negative_dims",
        "upgrade_opset",
        "cleanup",
        "fold_constants",
        "fold_batchnorm",
        "infer_shapes",
        "canonicalize_pooling",
        "cleanup",
    ]
    assert set(ops(model)) == {"Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm"}
    for batch in (1, 5):
        assert_close(run_onnx(proto, feeds(batch)), run_onnx(model, feeds(batch)))


@pytest.mark.parametrize("keepdims", [0, 1])
def test_spatial_mean_without_stored_shapes_becomes_global_average_pool(keepdims: int) -> None:
    """The TorchScript exporter stores no intermediate shapes; the pooling rewrite still sees the rank."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 1, 1], np.linspace(-1, 1, 12).tolist())
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["conv"]),
        helper.make_node("ReduceMean", ["conv"], ["output"], axes=[2, 3], keepdims=keepdims),
    ]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)]
    proto = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs, [weight]), opset_imports=[helper.make_opsetid("", 17)]
    )
    model = ir.serde.deserialize_model(proto)
    Pipeline(import_passes()).run(model, PassContext())
    assert ops(model) == ["Conv", "GlobalAveragePool", *(["Flatten"] if not keepdims else [])]
    pooled = next(node for node in model.graph if node.op_type == "GlobalAveragePool").outputs[0]
    assert list(pooled.shape)[1:] == [4, 1, 1]
    for batch in (1, 5):
        assert_close(run_onnx(proto, feeds(batch)), run_onnx(model, feeds(batch)), rtol=1e-5)
