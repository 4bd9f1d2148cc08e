"""The CPU lowering's speed-only rewrites: space-to-depth and depthwise stems, the per-conv int8 kernel path.

Both must leave every integer the same, so each test compares against the plain
fused lowering exactly (no tolerance).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import DEMO_ONNX, random_input
from onnx import TensorProto, helper, numpy_helper

from compressor import compress, runtime
from compressor import ir as cir
from compressor.backends import conv_kernels, get_backend
from compressor.backends.conv_kernels import ConvKernelChooser, offset_weights
from compressor.backends.depthwise_stem import depthwise_stems
from compressor.backends.qlinear import lower_to_qlinear
from compressor.backends.space_to_depth import space_to_depth_stems
from compressor.data import Dataset
from compressor.passes import import_passes
from compressor.passes.quantize_int8 import QuantizeInt8, QuantizeInt8Config
from compressor.pipeline import PassContext, Pipeline


def stem_model(channels: int, kernel: int, stride: int, pads: list[int], height: int, width: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    out = [(size + pads[i] + pads[i + 2] - kernel) // stride + 1 for i, size in enumerate((height, width))]
    inits = [
        numpy_helper.from_array(rng.uniform(-1, 1, (8, channels, kernel, kernel)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.uniform(-1, 1, 8).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.uniform(-1, 1, (8, 8, 3, 3)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="stem", strides=[stride, stride], pads=pads),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "w2"], ["output"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "stem",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", channels, height, width])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 8, *out])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def quantized(proto: onnx.ModelProto, tmp_path: Path) -> ir.Model:
    model = ir.serde.deserialize_model(proto)
    Pipeline(import_passes()).run(model, PassContext())
    shape = (16, *(d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]))
    np.savez(tmp_path / "calib.npz", x=random_input(shape, seed=1))
    data = Dataset(tmp_path / "calib.npz", runtime.input_specs(model))
    Pipeline([QuantizeInt8(QuantizeInt8Config(bias_correction=False))]).run(model, PassContext(calibration=data))
    return model


def fused(model: ir.Model, fold: bool) -> tuple[onnx.ModelProto, list[str]]:
    working = ir.serde.deserialize_model(cir.to_proto(model))
    folded = space_to_depth_stems(working.graph) if fold else []
    assert "stem" not in lower_to_qlinear(working)  # conv2 feeds the graph output and stays in QDQ form
    return cir.to_proto(working), folded


def outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return runtime.run(runtime.make_session(model), {"input": x})[0]


@pytest.mark.parametrize(
    ("kernel", "pads", "height", "width"),
    [
        (7, [3, 3, 3, 3], 32, 32),
        (3, [1, 1, 1, 1], 31, 29),
        (3, [0, 0, 1, 1], 30, 30),
        (5, [2, 1, 2, 1], 27, 33),
        (5, [1, 2, 2, 1], 28, 32),
    ],
    ids=["resnet-7x7", "3x3-odd-sizes", "tf-same-3x3", "5x5-uneven-pads", "5x5-uneven-pads-even-sizes"],
)
def test_space_to_depth_stem_is_exact(kernel: int, pads: list[int], height: int, width: int, tmp_path: Path) -> None:
    model = quantized(stem_model(3, kernel, 2, pads, height, width), tmp_path)
    plain, _ = fused(model, fold=False)
    folded, names = fused(model, fold=True)
    assert names == ["stem"]
    ops = [n.op_type for n in folded.graph.node]
    stem = next(n for n in folded.graph.node if n.name == "stem")
    # Even sizes fold as they are (the conv pads the folded input); odd ones are padded first.
    pad = [] if height % 2 == 0 and width % 2 == 0 else ["Pad"]
    assert ops[: 3 + len(pad)] == ["QuantizeLinear", *pad, "SpaceToDepth", "QLinearConv"]
    weight = next(t for t in folded.graph.initializer if t.name == stem.input[3])
    assert list(weight.dims) == [8, 12, (kernel + 1) // 2, (kernel + 1) // 2]
    x = random_input((3, 3, height, width), seed=2)
    np.testing.assert_array_equal(outputs(folded, x), outputs(plain, x))


@pytest.mark.parametrize(("channels", "stride"), [(3, 1), (16, 2)], ids=["stride-1", "16-channels"])
def test_space_to_depth_leaves_other_convs_alone(channels: int, stride: int, tmp_path: Path) -> None:
    model = quantized(stem_model(channels, 3, stride, [1, 1, 1, 1], 16, 16), tmp_path)
    assert fused(model, fold=True)[1] == []


def test_cpu_backend_folds_the_stem(tmp_path: Path) -> None:
    model = quantized(stem_model(3, 7, 2, [3, 3, 3, 3], 32, 32), tmp_path)
    lowered = get_backend("cpu").lower(model)
    assert "SpaceToDepth" in {n.op_type for n in lowered.graph.node}
    assert "SpaceToDepth" not in {n.op_type for n in get_backend("cpu", qdq=True).lower(model).graph.node}


@pytest.fixture(scope="module")
def demo_fused(tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    model = cir.load_model(DEMO_ONNX)
    Pipeline(import_passes()).run(model, PassContext())
    data = Dataset(DEMO_ONNX.with_suffix(".npz"), runtime.input_specs(model))
    Pipeline([QuantizeInt8(QuantizeInt8Config(bias_correction=False))]).run(model, PassContext(calibration=data))
    return fused(model, fold=False)[0]


def demo_outputs(model: onnx.ModelProto) -> np.ndarray:
    x = np.load(DEMO_ONNX.with_suffix(".npz"))["x"][:64]
    return outputs(model, x)


def test_offset_weights_are_the_same_weights(demo_fused: onnx.ModelProto) -> None:
    convs = list(conv_kernels.gemm_path_candidates(demo_fused))
    assert len(convs) >= 5
    shifted = offset_weights(demo_fused, convs)
    zeros = [n.input[5] for n in shifted.graph.node if n.op_type == "QLinearConv"]
    assert zeros.count(conv_kernels.OFFSET_ZERO_NAME) == len(convs)
    np.testing.assert_array_equal(demo_outputs(shifted), demo_outputs(demo_fused))


def test_candidates_skip_weights_that_cannot_shift(demo_fused: onnx.ModelProto) -> None:
    proto = onnx.ModelProto.FromString(demo_fused.SerializeToString())
    first = next(n for n in proto.graph.node if n.name in conv_kernels.gemm_path_candidates(proto))
    weight = next(t for t in proto.graph.initializer if t.name == first.input[3])
    values = numpy_helper.to_array(weight).copy()
    values.flat[0] = -128
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    assert first.name not in conv_kernels.gemm_path_candidates(proto)


def test_chooser_profiles_once_and_changes_no_output(
    demo_fused: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = conv_kernels._profile_pair
    monkeypatch.setattr(conv_kernels, "_profile_pair", lambda *args: calls.append(1) or real(*args))
    chooser = ConvKernelChooser()
    feeds = {"input": random_input((1, 1, 28, 28))}
    first = chooser(demo_fused, feeds)
    assert len(calls) == 1
    assert len(chooser.choices) == len(conv_kernels.gemm_path_candidates(demo_fused))
    again = chooser(demo_fused, feeds)
    assert len(calls) == 1, "a second lowering of the same convs must reuse the choices"
    assert again.SerializeToString() == first.SerializeToString()
    np.testing.assert_array_equal(demo_outputs(first), demo_outputs(demo_fused))


def test_profile_names_every_conv(demo_fused: onnx.ModelProto) -> None:
    times = conv_kernels._profile_pair(demo_fused, demo_fused, {"input": random_input((1, 1, 28, 28))}, 2)
    convs = [n.name for n in demo_fused.graph.node if n.op_type == "QLinearConv"]
    for per_node in times:
        assert set(convs) <= set(per_node)
        assert all(per_node[name] > 0 for name in convs)


def test_report_lists_the_lowering_rewrites(tmp_path: Path) -> None:
    source = tmp_path / "stem.onnx"
    onnx.save(stem_model(3, 7, 2, [3, 3, 3, 3], 32, 32), source)
    np.savez(tmp_path / "calib.npz", x=random_input((16, 3, 32, 32), seed=1))
    calib = tmp_path / "calib.npz"
    result = compress(source, target="int8", calib=calib, measure_latency=False, latency_guard=False)
    assert result.report.lowering["space_to_depth_stem"] == ["stem"]
    gemm = result.report.lowering.get("conv_on_gemm_path", [])
    zeros = {n.name: n.input[5] for n in result.lowered.graph.node if n.op_type == "QLinearConv"}
    assert all(zeros[name] == conv_kernels.OFFSET_ZERO_NAME for name in gemm)
    assert result.report.as_dict()["lowering"] == result.report.lowering


def test_folded_stem_is_not_reported_as_left_in_float(tmp_path: Path) -> None:
    model = quantized(stem_model(3, 7, 2, [3, 3, 3, 3], 32, 32), tmp_path)
    backend = get_backend("cpu")
    backend.lower(model)
    assert backend.rewrites["space_to_depth_stem"] == ["stem"]
    assert not [node for node in backend.rejected if "s2d" in node], backend.rejected


def test_float_session_keeps_the_int8_lowerings_record(tmp_path: Path) -> None:
    """The latency guard times the float model after lowering the int8 one; the report lists the latter's rewrites."""
    proto = stem_model(3, 7, 2, [3, 3, 3, 3], 32, 32)
    model = quantized(proto, tmp_path)
    backend = get_backend("cpu")
    backend.lower(model)
    rewrites = dict(backend.rewrites)
    float_model = ir.serde.deserialize_model(proto)
    assert backend.executable(float_model) is float_model, "a float model runs as it is, with no serialized copy"
    feeds = {"input": random_input((1, 3, 32, 32), seed=2)}
    expected = runtime.run(runtime.make_session(proto), feeds)[0]
    np.testing.assert_allclose(backend.run(backend.session(float_model), feeds)[0], expected, rtol=1e-5, atol=1e-5)
    assert backend.rewrites == rewrites and rewrites["space_to_depth_stem"] == ["stem"]


def test_conv_left_in_qdq_form_reads_constant_float_weights(tmp_path: Path) -> None:
    proto = stem_model(8, 3, 1, [1, 1, 1, 1], 16, 16)
    proto.graph.initializer.append(numpy_helper.from_array(np.linspace(-1, 1, 8).astype(np.float32), "b2"))
    next(n for n in proto.graph.node if n.name == "conv2").input.append("b2")
    model = quantized(proto, tmp_path)
    qdq = cir.to_proto(model)
    lowered, _ = fused(model, fold=False)
    conv2 = next(n for n in lowered.graph.node if n.name == "conv2")
    assert conv2.op_type == "Conv", "its output feeds the graph output, so it stays a float conv"
    producers = {output: node for node in lowered.graph.node for output in node.output}
    initializers = {t.name: t for t in lowered.graph.initializer}
    for stored_type, name in ((TensorProto.INT8, conv2.input[1]), (TensorProto.INT32, conv2.input[2])):
        mul = producers[name]
        cast = producers[mul.input[0]]
        assert (mul.op_type, cast.op_type) == ("Mul", "Cast"), "integers stay stored, times their scale"
        assert initializers[cast.input[0]].data_type == stored_type
        assert initializers[mul.input[1]].data_type == TensorProto.FLOAT
    folded = tmp_path / "folded.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(folded)
    ort.InferenceSession(lowered.SerializeToString(), options, providers=["CPUExecutionProvider"])
    assert not {"Cast", "Mul"} & {n.op_type for n in onnx.load(str(folded)).graph.node}, "folded at load"
    x = random_input((2, 8, 16, 16), seed=4)
    np.testing.assert_allclose(outputs(lowered, x), outputs(qdq, x), rtol=1e-5, atol=1e-5)


def test_float_conv_between_int8_ops_keeps_its_per_channel_weights(tmp_path: Path) -> None:
    """onnxruntime's WeightBiasQuantization would quantize again, per tensor, the weights of a float conv read
    through a per-tensor DequantizeLinear and feeding a QuantizeLinear; the lowering keeps the conv out of it."""
    proto = stem_model(3, 3, 1, [1, 1, 1, 1], 16, 16)
    model = ir.serde.deserialize_model(proto)
    Pipeline(import_passes()).run(model, PassContext())
    np.savez(tmp_path / "calib.npz", x=random_input((16, 3, 16, 16), seed=1))
    data = Dataset(tmp_path / "calib.npz", runtime.input_specs(model))
    config = QuantizeInt8Config(weights="asymmetric", bias_correction=False)  # no QLinearConv for these weights
    Pipeline([QuantizeInt8(config)]).run(model, PassContext(calibration=data))
    backend = get_backend("cpu")
    lowered = backend.lower(model)
    assert "asymmetric" in backend.rejected["stem"]
    feeds = {"input": random_input((4, 3, 16, 16), seed=2)}
    as_written = ort.InferenceSession(
        lowered.SerializeToString(), providers=["CPUExecutionProvider"], disabled_optimizers=["WeightBiasQuantization"]
    ).run(None, feeds)[0]
    np.testing.assert_allclose(outputs(lowered, feeds["input"]), as_written, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("channels", "kernel", "pads"),
    [(1, 3, [1, 1, 1, 1]), (1, 5, [2, 1, 2, 1]), (3, 3, [1, 1, 1, 1])],
    ids=["grayscale-3x3", "grayscale-5x5-uneven", "rgb-untouched"],
)
def test_single_channel_stem_runs_depthwise_and_is_exact(
    channels: int, kernel: int, pads: list[int], tmp_path: Path
) -> None:
    model = quantized(stem_model(channels, kernel, 1, pads, 20, 18), tmp_path)
    plain, _ = fused(model, fold=False)
    working = ir.serde.deserialize_model(plain)
    names = depthwise_stems(working.graph)
    if channels != 1:
        assert names == []
        return
    assert names == ["stem"]
    rewritten = cir.to_proto(working)
    stem = next(n for n in rewritten.graph.node if n.name == "stem")
    assert next(a.i for a in stem.attribute if a.name == "group") == 8
    assert "Tile" in {n.op_type for n in rewritten.graph.node}
    x = random_input((3, 1, 20, 18), seed=5)
    np.testing.assert_array_equal(outputs(rewritten, x), outputs(plain, x))
    backend = get_backend("cpu")
    backend.lower(model)
    assert backend.rewrites["depthwise_stem"] == ["stem"]
