"""Shared builders: small real ONNX graphs made with onnx.helper, run by onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

DEMO_ONNX = Path(__file__).resolve().parents[1] / "compressor" / "demo" / "demo.onnx"


def conv_bn_model(opset: int = 17, identity: bool = True, seed: int = 0) -> onnx.ModelProto:
    """input[N,3,8,8] -> Conv(+bias) -> BatchNormalization -> Relu -> Conv(no bias) -> BN -> GAP -> Flatten -> Gemm.

    With ``identity`` an Identity sits between the first weight and its Conv, as torch exports do.
    """
    rng = np.random.default_rng(seed)

    def init(name: str, *shape: int, low: float = -1.0, high: float = 1.0) -> TensorProto:
        return numpy_helper.from_array(rng.uniform(low, high, shape).astype(np.float32), name)

    initializers = [
        init("w1", 8, 3, 3, 3),
        init("b1", 8),
        init("w2", 8, 8, 3, 3),
        init("fc_w", 5, 8),
        init("fc_b", 5),
    ]
    for prefix in ("bn1", "bn2"):
        initializers += [
            init(f"{prefix}_scale", 8, low=0.5, high=1.5),
            init(f"{prefix}_bias", 8),
            init(f"{prefix}_mean", 8),
            init(f"{prefix}_var", 8, low=0.5, high=2.0),
        ]
    nodes = []
    weight = "w1"
    if identity:
        nodes.append(helper.make_node("Identity", ["w1"], ["w1_id"], name="weight_identity"))
        weight = "w1_id"
    nodes += [
        helper.make_node("Conv", ["input", weight, "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization",
            ["c1", "bn1_scale", "bn1_bias", "bn1_mean", "bn1_var"],
            ["n1"],
            name="bn1",
            epsilon=1e-3,
        ),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c2", "bn2_scale", "bn2_bias", "bn2_mean", "bn2_var"], ["n2"], name="bn2"
        ),
        helper.make_node("GlobalAveragePool", ["n2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_bn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def run_onnx(model: onnx.ModelProto | ir.Model | str | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Plain onnxruntime on the CPU, all graph optimisations off."""
    if isinstance(model, ir.Model):
        model = ir.to_proto(model)
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_close(reference: list[np.ndarray], test: list[np.ndarray], rtol: float = 1e-5) -> None:
    """Every output within ``rtol`` of the reference's largest magnitude."""
    assert len(reference) == len(test)
    for ref, out in zip(reference, test, strict=True):
        assert ref.shape == out.shape
        bound = rtol * float(np.max(np.abs(ref))) + 1e-7
        assert float(np.max(np.abs(ref - out))) <= bound


def float_model(
    name: str,
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    shapes: tuple[list[int | str], list[int | str]],
    opset: int = 17,
    names: tuple[str, str] = ("input", "output"),
) -> onnx.ModelProto:
    """One float input and one float output of the given (input, output) shapes around ``nodes``."""
    (source, target), (input_shape, output_shape) = names, shapes
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(source, TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info(target, TensorProto.FLOAT, output_shape)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def random_input(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture
def conv_bn() -> onnx.ModelProto:
    return conv_bn_model()


@pytest.fixture
def small_calib(tmp_path: Path) -> Path:
    path = tmp_path / "calib.npz"
    np.savez(path, x=random_input((32, 3, 8, 8), seed=1))
    return path
