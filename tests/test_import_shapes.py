"""Models others export: IR version 3 (weights as inputs), symbolic spatial sizes, ``-1`` sizes.

Each was a failure of ``--target fp32`` on a valid model that onnxruntime runs:
an invalid output, a refusal, an internal error. Hand-built graphs keep each case.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_cli import assert_refused, run_cli

from compressor import compress
from compressor.metrics import compute_cost

QUICK = {"measure_latency": False, "progress": False}


def conv_bn_relu(path: Path, ir_version: int, opset: int, dims: list[int | str]) -> Path:
    """Conv -> BatchNormalization -> Relu on 3 channels; IR 3 lists every weight as a graph input too."""
    rng = np.random.default_rng(0)
    arrays = {
        "w": rng.normal(size=(4, 3, 3, 3)),
        "scale": rng.uniform(0.5, 1.5, 4),
        "bias": rng.normal(size=4),
        "mean": rng.normal(size=4),
        "var": rng.uniform(0.5, 1.5, 4),
    }
    weights = [numpy_helper.from_array(a.astype(np.float32), name) for name, a in arrays.items()]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["y"], name="relu"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)]
    if ir_version < 4:
        inputs += [helper.make_tensor_value_info(w.name, TensorProto.FLOAT, list(w.dims)) for w in weights]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [dims[0], 4, dims[2], dims[3]])
    graph = helper.make_graph(nodes, "conv_bn_relu", inputs, [output], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def run(model: str | onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def assert_valid(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


def test_ir3_weights_as_inputs_give_a_valid_current_model(tmp_path: Path) -> None:
    source = conv_bn_relu(tmp_path / "ir3.onnx", ir_version=3, opset=9, dims=[1, 3, 16, 16])
    before = source.read_bytes()
    result = compress(source, "fp32", **QUICK)
    assert_valid(result.lowered)
    assert result.lowered.ir_version >= 7, "opset 13 needs IR version 7"
    assert [i.name for i in result.lowered.graph.input] == ["x"]
    assert not [n for n in result.lowered.graph.node if n.op_type == "BatchNormalization"], "BN folded"
    x = np.random.default_rng(1).normal(size=(1, 3, 16, 16)).astype(np.float32)
    expected, actual = run(str(source), x), run(result.lowered, x)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert source.read_bytes() == before
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(2).normal(size=(16, 3, 16, 16)).astype(np.float32))
    assert_valid(compress(source, "int8", calib=calib, **QUICK).lowered)


@pytest.mark.parametrize("dims", [["N", 3, "H", "W"], [-1, 3, -1, -1]], ids=["named", "minus-one"])
def test_open_spatial_sizes_stay_open_and_fp32_needs_no_data(tmp_path: Path, dims: list[int | str]) -> None:
    source = conv_bn_relu(tmp_path / "open.onnx", ir_version=8, opset=17, dims=dims)
    result = compress(source, "fp32", **QUICK)
    assert_valid(result.lowered)
    shape = result.lowered.graph.input[0].type.tensor_type.shape.dim
    assert [d.HasField("dim_value") for d in shape] == [False, True, False, False], shape
    assert all(d.dim_value >= 0 for d in shape)
    for size in ((9, 13), (32, 20)):  # any size still runs, with the original's outputs
        x = np.random.default_rng(3).normal(size=(2, 3, *size)).astype(np.float32)
        expected = run(str(source), x)
        np.testing.assert_allclose(run(result.lowered, x), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    rows = {row.label: row for row in result.report.rows}
    assert rows["MACs (batch 1)"].fp32 is None, "no size to count MACs at"
    assert any("MACs not counted" in note and "--input-shape" in note for note in result.report.notes)
    assert any(note.startswith("accuracy and SQNR not measured") for note in result.report.notes)


def test_input_shape_gives_the_sizes_to_measure_at(tmp_path: Path) -> None:
    source = conv_bn_relu(tmp_path / "open.onnx", ir_version=8, opset=17, dims=["N", 3, "H", "W"])
    result = compress(source, "fp32", input_shapes={"x": (1, 3, 20, 12)}, verify=True, **QUICK)
    rows = {row.label: row for row in result.report.rows}
    expected_macs = compute_cost(onnx.load(source), {"x": (1, 3, 20, 12)}).macs
    assert rows["MACs (batch 1)"].fp32 == expected_macs == 4 * 3 * 9 * 20 * 12
    assert rows["SQNR vs fp32"].compressed > 100.0 and not result.report.notes
    assert not result.lowered.graph.input[0].type.tensor_type.shape.dim[2].HasField("dim_value"), "H stays open"


def test_open_sizes_are_counted_at_the_data_size(tmp_path: Path) -> None:
    source = conv_bn_relu(tmp_path / "open.onnx", ir_version=8, opset=17, dims=[-1, 3, -1, -1])
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(2).normal(size=(16, 3, 20, 12)).astype(np.float32))
    result = compress(source, "int8", calib=calib, **QUICK)
    assert_valid(result.lowered)
    macs = {row.label: row for row in result.report.rows}["MACs (batch 1)"]
    assert macs.fp32 == macs.compressed == 4 * 3 * 9 * 20 * 12


@pytest.mark.parametrize(
    ("flag", "keyword"),
    [("y=1,3,8,8", "not an input"), ("x=1,3,8", "does not fit"), ("x=1,4,8,8", "does not fit"), ("x=a,b", "NAME=")],
)
def test_bad_input_shapes_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, keyword: str
) -> None:
    source = conv_bn_relu(tmp_path / "open.onnx", ir_version=8, opset=17, dims=["N", 3, "H", "W"])
    assert_refused([source, "--no-latency", "--input-shape", flag], keyword, tmp_path, capsys)


def test_cli_writes_open_models_without_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = conv_bn_relu(tmp_path / "open.onnx", ir_version=8, opset=17, dims=[-1, 3, -1, -1])
    code, out, err = run_cli([source], capsys)
    assert code == 0, err
    assert "note: latency not measured: input x has symbolic" in out
    assert (tmp_path / "open.fp32.onnx").is_file()


def nhwc_detector_head(path: Path) -> Path:
    """NHWC input with open H, W: Transpose in, Conv -> Relu -> Conv -> Sigmoid, Transpose out."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array((rng.normal(size=(8, 3, 3, 3)) * 0.3).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "b"),
        numpy_helper.from_array((rng.normal(size=(4, 8, 1, 1)) * 0.3).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2], name="to_nchw"),
        helper.make_node("Conv", ["t", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["c2"], name="conv2"),
        helper.make_node("Sigmoid", ["c2"], ["s"], name="scores"),
        helper.make_node("Transpose", ["s"], ["y"], perm=[0, 2, 3, 1], name="to_nhwc"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "H", "W", 3])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "H", "W", 4])]
    graph = helper.make_graph(nodes, "nhwc", inputs, outputs, weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def test_nhwc_input_with_open_sizes_quantizes(tmp_path: Path) -> None:
    source = nhwc_detector_head(tmp_path / "nhwc.onnx")
    calib = tmp_path / "calib.npz"
    rng = np.random.default_rng(1)
    np.savez(calib, x=rng.uniform(0, 1, size=(32, 24, 40, 3)).astype(np.float32))
    result = compress(source, "int8", calib=calib, latency_guard=False, **QUICK)
    assert_valid(result.lowered)
    assert "QLinearConv" in {node.op_type for node in result.lowered.graph.node}
    x = rng.uniform(0, 1, size=(2, 17, 33, 3)).astype(np.float32)  # another size: H, W stay open
    expected, actual = run(str(source), x), run(result.lowered, x)
    noise = np.sum((expected - actual) ** 2)
    assert 10 * np.log10(np.sum(expected**2) / noise) > 30.0
