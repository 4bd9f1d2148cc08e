"""Narrow storage of scales and biases: fewer bytes, and the very same values once onnxruntime loads the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import DEMO_ONNX
from onnx import TensorProto, helper, numpy_helper

from compressor import ir as cir
from compressor import runtime
from compressor.backends.compact import compact
from compressor.backends.narrow_storage import narrow_storage
from compressor.backends.qlinear import lower_to_qlinear
from compressor.data import Dataset
from compressor.passes import import_passes
from compressor.passes.quantize_int8 import QuantizeInt8, QuantizeInt8Config
from compressor.pipeline import PassContext, Pipeline
from compressor.quantization.params import half_exact

DEMO_NPZ = DEMO_ONNX.with_suffix(".npz")


def test_half_exact_scales_are_float16_values_at_or_just_above() -> None:
    scale = np.random.default_rng(0).uniform(1e-4, 1.0, 1000).astype(np.float32)
    rounded = half_exact(scale)
    np.testing.assert_array_equal(rounded.astype(np.float16).astype(np.float32), rounded)
    assert np.all(rounded >= scale) and np.all(rounded <= scale * (1 + 2**-10))
    out_of_range = np.array([1e-6, 1e-9, 4e4], np.float32)  # float16 subnormals and near its maximum
    np.testing.assert_array_equal(half_exact(out_of_range), out_of_range)


@pytest.fixture(scope="module")
def lowered_demo() -> onnx.ModelProto:
    model = ir.serde.deserialize_model(onnx.load(str(DEMO_ONNX)))
    Pipeline(import_passes()).run(model, PassContext())
    data = Dataset(DEMO_NPZ, runtime.input_specs(model))
    Pipeline([QuantizeInt8(QuantizeInt8Config(min_sqnr_db=None))]).run(model, PassContext(calibration=data))
    lower_to_qlinear(model)
    return compact(cir.to_proto(model))


def outputs(model: onnx.ModelProto, x: np.ndarray, level: ort.GraphOptimizationLevel) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def test_same_outputs_to_the_bit_in_fewer_bytes(lowered_demo: onnx.ModelProto, tmp_path: Path) -> None:
    narrow = onnx.ModelProto.FromString(lowered_demo.SerializeToString())
    names = narrow_storage(narrow)
    assert any(name.endswith("_ws") for name in names) and any(name.endswith("_bq") for name in names)
    assert narrow.ByteSize() < lowered_demo.ByteSize()
    stored = {t.name: t.data_type for t in narrow.graph.initializer}
    assert {stored[f"{name}_n"] for name in names} == {TensorProto.FLOAT16, TensorProto.INT16}
    x = np.load(DEMO_NPZ)["x"][:64]
    expected = outputs(lowered_demo, x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        np.testing.assert_array_equal(outputs(narrow, x, level), expected)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "loaded.onnx")
    ort.InferenceSession(narrow.SerializeToString(), options, providers=["CPUExecutionProvider"])
    assert "Cast" not in {n.op_type for n in onnx.load(str(tmp_path / "loaded.onnx")).graph.node}, "folded at load"


def test_only_exact_and_worthwhile_narrowing() -> None:
    tensors = {
        "halves": np.linspace(0, 1, 65).astype(np.float32),  # multiples of 1/64: float16 holds them
        "thirds": np.full(64, 1 / 3, np.float32),  # float16 does not
        "small_ints": np.arange(-64, 64, dtype=np.int32),
        "big_ints": np.arange(64, dtype=np.int32) * 1000,  # up to 63000: beyond int16
        "few": np.zeros(8, np.int32),  # 16 bytes saved would not pay for the Cast
        "overridable": np.zeros(64, np.float32),
    }
    nodes = [helper.make_node("Identity", [name], [f"{name}_out"]) for name in tensors]
    outputs = [helper.make_tensor_value_info(f"{name}_out", helper.np_dtype_to_tensor_dtype(array.dtype), array.shape)
               for name, array in tensors.items()]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "constants",
        [helper.make_tensor_value_info("overridable", TensorProto.FLOAT, [64])],
        outputs,
        [numpy_helper.from_array(array, name) for name, array in tensors.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert sorted(narrow_storage(model)) == ["halves", "small_ints"]
    session = runtime.make_session(model)
    results = dict(zip((o.name for o in session.get_outputs()), session.run(None, {}), strict=True))
    for name, array in tensors.items():
        if name != "overridable":
            np.testing.assert_array_equal(results[f"{name}_out"], array)
            assert results[f"{name}_out"].dtype == array.dtype
