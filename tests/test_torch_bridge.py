"""The IR→torch bridge (`compressor.torch_bridge`): numerics vs onnxruntime, gradients, write-back, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F
from conftest import DEMO_ONNX, assert_close, conv_bn_model, random_input, run_onnx
from onnx import TensorProto, helper, numpy_helper

from benchmarks import models
from benchmarks.thirdparty import CORPUS, CorpusModel, feeds
from benchmarks.zoo_build import export
from compressor.errors import CompressorError
from compressor.ir import load_model
from compressor.torch_bridge import NodeExecutionError, TorchBridge, UnsupportedOpError

DEMO_DATA = DEMO_ONNX.with_suffix(".npz")
FMNIST = ["resnet", "mobilenetv2", "squeezenet", "shufflenetv2", "vgg"]
# Corpus models the bridge refuses, and the op it names.
UNSUPPORTED = {
    "silero_vad": "If",
    "silero_vad_16k_op15": "If",
    "silero_vad_half": "If",
    "silero_vad_ifless": "If",
    "silero_vad_sequence": "LSTM",
    "silero_vad_openvino": "LSTM",
}


def bridge_outputs(model: ir.Model, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    bridge = TorchBridge(model)
    names = [v.name for v in model.graph.inputs if v.name not in model.graph.initializers]
    with torch.no_grad():
        return [t.numpy() for t in bridge(*[torch.from_numpy(inputs[n]) for n in names])]


def demo_batch(n: int = 16) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(DEMO_DATA)
    return data["x"][:n], data["y"][:n]


def test_demo_matches_onnxruntime() -> None:
    model = load_model(DEMO_ONNX)
    x, _ = demo_batch()
    assert_close(run_onnx(model, {"input": x}), bridge_outputs(model, {"input": x}))


def test_conv_batchnorm_identity_graph() -> None:
    model = ir.serde.deserialize_model(conv_bn_model())
    x = {"input": random_input((4, 3, 8, 8))}
    assert_close(run_onnx(model, x), bridge_outputs(model, x))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter's
@pytest.mark.parametrize("name", FMNIST)
def test_fashion_mnist_architectures(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "model.onnx"
    export(models.ARCHITECTURES[name]().eval(), path, dynamo=False)  # the dynamo exporter is ~6 s a model
    model = load_model(path)
    x = {"input": random_input((4, 1, 28, 28))}
    assert_close(run_onnx(model, x), bridge_outputs(model, x))


@pytest.mark.parametrize("corpus", CORPUS, ids=[m.name for m in CORPUS])
def test_thirdparty_corpus(corpus: CorpusModel) -> None:
    if not corpus.path.is_file():
        pytest.fail(f"{corpus.path} is not cached; run `make corpus` (python -m benchmarks.thirdparty fetch)")
    model = load_model(corpus.path, check=False)
    if corpus.name in UNSUPPORTED:  # refused when built, before any data is seen
        with pytest.raises(UnsupportedOpError, match=rf"cannot run {UNSUPPORTED[corpus.name]} at node '"):
            TorchBridge(model)
        return
    inputs = feeds(corpus)
    expected, actual = run_onnx(model, inputs), bridge_outputs(model, inputs)
    assert len(actual) == len(expected)
    for want, got in zip(expected, actual, strict=True):
        assert want.shape == got.shape
        # 1e-5 of the output's scale, plus float32 rounding near 0: onnxruntime's Sigmoid is off by up to
        # 1e-7 there (0 for sigmoid(-17)), where the OCR detector's head sits on random inputs.
        assert float(np.max(np.abs(want - got))) <= 1e-5 * float(np.max(np.abs(want))) + 2e-7


def test_gradients_sgd_step_and_write_back() -> None:
    model = load_model(DEMO_ONNX)
    bridge = TorchBridge(model)
    x, y = (torch.from_numpy(a) for a in demo_batch())
    before = bridge(x)[0].detach()
    F.cross_entropy(bridge(x)[0], y.long()).backward()
    conv_weights = [node.inputs[1].name for node in model.graph if node.op_type == "Conv"]
    assert conv_weights
    for name in conv_weights:
        grad = bridge.parameter_for(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0
    torch.optim.SGD(bridge.parameters(), lr=0.1).step()
    after = bridge(x)[0].detach()
    assert (after - before).abs().max() > 1e-4
    shapes = {name: (v.const_value.dtype, v.const_value.shape) for name, v in model.graph.initializers.items()}
    changed = bridge.write_back()
    assert set(conv_weights) <= set(changed)
    assert {n: (v.const_value.dtype, v.const_value.shape) for n, v in model.graph.initializers.items()} == shapes
    assert bridge.write_back() == []  # nothing moved since
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto)
    assert_close(run_onnx(proto, {"input": x.numpy()}), [after.numpy()])


def test_trainable_excludes_names_and_integers_are_not_parameters() -> None:
    model = load_model(DEMO_ONNX)
    floats = [n for n, v in model.graph.initializers.items() if v.const_value.dtype == ir.DataType.FLOAT]
    integers = [n for n, v in model.graph.initializers.items() if v.const_value.dtype.is_integer()]
    frozen = set(floats[::2])
    bridge = TorchBridge(model, trainable=lambda name: name not in frozen)
    assert len(list(bridge.parameters())) == len(floats)
    assert {n for n in floats if not bridge.parameter_for(n).requires_grad} == frozen
    bridge(torch.from_numpy(demo_batch(4)[0]))[0].sum().backward()
    assert all(bridge.parameter_for(n).grad is None for n in frozen)
    assert all(bridge.parameter_for(n).grad is not None for n in set(floats) - frozen)
    assert integers, "the demo's Reshape shape is an int64 initializer"
    for name in integers:
        with pytest.raises(KeyError, match=name):
            bridge.parameter_for(name)


def test_initializers_listed_as_graph_inputs() -> None:
    proto = conv_bn_model(opset=8, identity=False)
    proto.ir_version = 3
    proto.graph.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in proto.graph.initializer
    )
    model = ir.serde.deserialize_model(proto)
    assert len(model.graph.inputs) > 1
    x = {"input": random_input((2, 3, 8, 8))}
    assert_close(run_onnx(proto, x), bridge_outputs(model, x))


def one_node_model(
    node: onnx.NodeProto, inputs: dict[str, np.ndarray], opset: int, inits: dict[str, np.ndarray] | None = None
) -> ir.Model:
    graph = helper.make_graph(
        [node],
        "one_node",
        [
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
            for n, a in inputs.items()
        ],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in node.output],
        [numpy_helper.from_array(a, n) for n, a in (inits or {}).items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    return ir.serde.deserialize_model(proto)


def test_unsupported_ops_are_refused_when_built() -> None:
    x = {"x": random_input((1, 4))}
    nms = helper.make_node("NonMaxSuppression", ["x", "x"], ["y"], name="nms")
    with pytest.raises(UnsupportedOpError) as info:
        TorchBridge(one_node_model(nms, x, 17))
    assert isinstance(info.value, CompressorError)
    assert "NonMaxSuppression at node 'nms' (domain 'ai.onnx')" in str(info.value)
    assert "the bridge supports: Abs, Add" in str(info.value)
    custom = helper.make_node("Relu", ["x"], ["y"], name="mine", domain="com.example")
    proto = ir.to_proto(one_node_model(custom, x, 17))
    proto.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(UnsupportedOpError, match=r"Relu at node 'mine' \(domain 'com.example'\)"):
        TorchBridge(ir.serde.deserialize_model(proto))
    branch = helper.make_graph([], "b", [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)])
    cond = helper.make_node("If", ["c"], ["y"], name="branch", then_branch=branch, else_branch=branch)
    with pytest.raises(UnsupportedOpError, match=r"If at node 'branch'.*nested graphs"):
        TorchBridge(one_node_model(cond, {"c": np.array(True)}, 17))


def test_errors_name_the_node() -> None:
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape_it")
    model = one_node_model(node, {"x": random_input((2, 6)), "shape": np.array([5, 5], np.int64)}, 17)
    bridge = TorchBridge(model)
    assert bridge(torch.zeros(2, 6), torch.tensor([3, 4]))[0].shape == (3, 4)
    with pytest.raises(NodeExecutionError, match=r"while executing node 'reshape_it' \(Reshape\): .*invalid") as info:
        bridge(torch.zeros(2, 6), torch.tensor([5, 5]))
    assert isinstance(info.value, CompressorError) and isinstance(info.value.__cause__, RuntimeError)


def _f(*shape: int) -> np.ndarray:
    return np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)


def _i(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def case(op: str, inputs: dict[str, np.ndarray], opset: int = 17, case_id: str = "", **attrs: object) -> object:
    names = [n if not n.startswith("_") else "" for n in inputs]
    node = helper.make_node(op, names, ["y"], name=op.lower(), **attrs)
    fed = {n: a for n, a in inputs.items() if not n.startswith("_")}
    return pytest.param(node, fed, opset, id=case_id or op)


X4 = _f(1, 4, 7, 8)
RESIZE = {"x": _f(1, 2, 3, 4), "_roi": _f(0)}
CASES = [
    case("Conv", {"x": X4, "w": _f(6, 2, 3, 3), "b": _f(6)}, case_id="conv-asymmetric-pads-group",
         group=2, pads=[0, 1, 2, 0], strides=[2, 1], dilations=[1, 2]),
    case("Conv", {"x": X4, "w": _f(3, 4, 4, 4)}, case_id="conv-same-upper", auto_pad="SAME_UPPER", strides=[2, 2]),
    case("Conv", {"x": X4, "w": _f(3, 4, 4, 2)}, case_id="conv-same-lower", auto_pad="SAME_LOWER"),
    case("Conv", {"x": _f(2, 3, 10), "w": _f(4, 3, 3)}, case_id="conv-1d-valid", auto_pad="VALID", strides=[2]),
    case("ConvTranspose", {"x": _f(1, 4, 5, 5), "w": _f(4, 3, 3, 3), "b": _f(6)}, case_id="conv-transpose",
         strides=[2, 2], pads=[1, 0, 0, 1], output_padding=[1, 1], group=2),
    case("MaxPool", {"x": X4}, case_id="maxpool-ceil", kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 0],
         ceil_mode=1),
    case("MaxPool", {"x": _f(1, 2, 6, 6)}, case_id="maxpool-ceil-last-window-in-padding", kernel_shape=[2, 2],
         strides=[2, 2], pads=[0, 0, 1, 1], ceil_mode=1),
    case("MaxPool", {"x": X4}, case_id="maxpool-dilated", kernel_shape=[2, 2], dilations=[2, 2], ceil_mode=1,
         strides=[2, 2]),
    case("AveragePool", {"x": X4}, case_id="avgpool-include-pad", kernel_shape=[3, 3], strides=[2, 2],
         pads=[1, 1, 1, 1], count_include_pad=1, ceil_mode=1),
    case("AveragePool", {"x": X4}, case_id="avgpool-exclude-pad", kernel_shape=[3, 3], strides=[2, 2],
         pads=[1, 0, 0, 1], ceil_mode=1),
    case("Gemm", {"a": _f(4, 3), "b": _f(5, 4), "c": _f(5)}, transA=1, transB=1, alpha=0.5, beta=2.0),
    case("Slice", {"x": _f(6, 7, 8), "s": _i(5, 1, -1), "e": _i(-(2**63), 2**63 - 1, 0), "a": _i(0, 1, 2),
                   "t": _i(-2, 2, -3)}, case_id="slice-negative-steps"),
    case("Slice", {"x": _f(6, 7)}, opset=9, case_id="slice-attrs", starts=[1, -3], ends=[100, -1], axes=[0, 1]),
    case("Softmax", {"x": _f(2, 3, 4)}, opset=11, case_id="softmax-11", axis=1),
    case("Softmax", {"x": _f(2, 3, 4)}, opset=13, case_id="softmax-13", axis=1),
    case("LogSoftmax", {"x": _f(2, 3, 4)}, opset=11, case_id="logsoftmax-11"),
    case("Resize", {**RESIZE, "scales": np.array([1, 1, 2.5, 1.5], np.float32)}, case_id="resize-nearest",
         mode="nearest"),
    case("Resize", {**RESIZE, "_s": _f(0), "sizes": _i(1, 2, 7, 5)}, case_id="resize-nearest-asymmetric",
         mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
    case("Resize", {**RESIZE, "scales": np.array([1, 1, 2, 2], np.float32)}, case_id="resize-nearest-halves-floor",
         mode="nearest", coordinate_transformation_mode="asymmetric"),
    case("Resize", {**RESIZE, "scales": np.array([1, 1, 2, 2], np.float32)}, case_id="resize-nearest-halves-ceil",
         mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="round_prefer_ceil"),
    case("Resize", {**RESIZE, "scales": np.array([1, 1, 2, 0.5], np.float32)}, case_id="resize-linear",
         mode="linear"),
    case("Resize", {**RESIZE, "_s": _f(0), "sizes": _i(1, 2, 5, 7)}, case_id="resize-linear-align-corners",
         mode="linear", coordinate_transformation_mode="align_corners"),
    case("Resize", {**RESIZE, "scales": np.array([1, 1, 3, 2], np.float32)}, case_id="resize-pytorch-half-pixel",
         mode="linear", coordinate_transformation_mode="pytorch_half_pixel"),
    case("Upsample", {"x": _f(1, 2, 3, 4), "scales": np.array([1, 1, 2, 3], np.float32)}, opset=9),
    case("Reshape", {"x": X4, "shape": _i(0, 2, -1)}, case_id="reshape-zero-and-minus-one"),
    case("Clip", {"x": X4}, opset=6, case_id="clip-6", min=-0.5, max=0.7),
    case("Pad", {"x": X4, "p": _i(0, 0, 2, 1, 0, 0, 1, 3)}, case_id="pad-reflect", mode="reflect"),
    case("Pad", {"x": X4, "p": _i(0, 1, 2, 1, 0, 0, 1, 3)}, case_id="pad-edge", mode="edge"),
    case("Pad", {"x": X4, "p": _i(0, 0, 2, 1, 0, 0, 1, 3)}, opset=19, case_id="pad-wrap", mode="wrap"),
    case("Pad", {"x": X4, "p": _i(0, 1, -2, 1, 0, 0, 1, 3), "v": np.array(0.5, np.float32)}, case_id="pad-constant"),
    case("ReduceMean", {"x": X4, "axes": _i(-1, 1)}, opset=18, keepdims=0),
    case("ReduceMax", {"x": X4}, opset=11, axes=[2]),
    case("LayerNormalization", {"x": X4, "s": _f(7, 8), "b": _f(8)}, axis=-2, epsilon=1e-3),
    case("InstanceNormalization", {"x": X4, "s": _f(4), "b": _f(4)}),
    case("HardSigmoid", {"x": X4}, alpha=0.3, beta=0.4),
    case("Einsum", {"a": _f(2, 3, 4), "b": _f(2, 4, 5)}, equation="bij,bjk->bik"),
    case("Mean", {"a": _f(3, 1), "b": _f(1, 4), "c": _f(4)}),
]  # fmt: skip


@pytest.mark.parametrize(("node", "inputs", "opset"), CASES)
def test_single_ops_match_onnxruntime(node: onnx.NodeProto, inputs: dict[str, np.ndarray], opset: int) -> None:
    model = one_node_model(node, inputs, opset)
    assert_close(run_onnx(model, inputs), bridge_outputs(model, inputs))


def test_softmax_axis_semantics_differ_by_opset() -> None:
    x = {"x": _f(2, 3, 4)}
    picked = [c.values for c in CASES if c.id in ("softmax-11", "softmax-13")]
    old, new = (bridge_outputs(one_node_model(node, x, opset), x)[0] for node, _, opset in picked)
    assert not np.allclose(old, new)


def test_split_and_shape_ops_on_integer_paths() -> None:
    nodes = [
        helper.make_node("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3),
        helper.make_node("Shape", ["a"], ["shape"], start=-2),
        helper.make_node("ConstantOfShape", ["shape"], ["ones"], value=numpy_helper.from_array(np.ones(1, np.float32))),
        helper.make_node("Mul", ["ones", "c"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "ints",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 7, 3])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("a", "b", "y")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    model, x = ir.serde.deserialize_model(proto), {"x": _f(2, 7, 3)}
    expected = run_onnx(model, x)
    assert [a.shape for a in expected] == [(2, 3, 3), (2, 3, 3), (2, 3, 3)]
    assert_close(expected, bridge_outputs(model, x))
