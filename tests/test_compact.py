"""The deployment trim of a lowered model: same integers, fewer bytes, and the user's names untouched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from conftest import DEMO_ONNX, float_model, random_input
from onnx import helper, numpy_helper

from compressor import compress, runtime
from compressor import ir as cir
from compressor.backends.compact import compact
from compressor.backends.qlinear import lower_to_qlinear
from compressor.data import Dataset
from compressor.passes import import_passes
from compressor.passes.quantize_int8 import QuantizeInt8, QuantizeInt8Config
from compressor.pipeline import PassContext, Pipeline


def model_with_float_gain() -> onnx.ModelProto:
    """Conv -> Relu -> Conv -> Relu -> Mul by a float initializer named like our scales; Mul stays float."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.uniform(-1, 1, (8, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.uniform(-1, 1, (4, 8, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.full((1, 4, 1, 1), 0.5, np.float32), "gain_scale"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], group=1),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Mul", ["r2", "gain_scale"], ["output"], name="gain"),
    ]
    return float_model("gain", nodes, inits, (["batch", 3, 12, 12], ["batch", 4, 12, 12]))


def lowered_untrimmed(proto: onnx.ModelProto, tmp_path: Path) -> onnx.ModelProto:
    model = ir.serde.deserialize_model(proto)
    Pipeline(import_passes()).run(model, PassContext())
    np.savez(tmp_path / "calib.npz", x=random_input((16, 3, 12, 12), seed=1))
    data = Dataset(tmp_path / "calib.npz", runtime.input_specs(model))
    Pipeline([QuantizeInt8(QuantizeInt8Config())]).run(model, PassContext(calibration=data))
    lower_to_qlinear(model)
    lowered = cir.to_proto(model)
    for key, value in (("pkg.torch.export.ExportedProgram.graph_signature", "p_w1: PARAMETER"), ("owner", "team")):
        lowered.graph.metadata_props.add(key=key, value=value)
    gain = next(node for node in lowered.graph.node if node.name == "gain")
    for key, value in (("namespace", ": Model/gain"), ("pkg.torch.onnx.fx_node", "%mul = ..."), ("note", "kept")):
        gain.metadata_props.add(key=key, value=value)
    return lowered


def test_trim_keeps_every_integer_and_the_users_names(tmp_path: Path) -> None:
    before = lowered_untrimmed(model_with_float_gain(), tmp_path)
    assert before.graph.value_info, "the IR writes shapes of intermediate values"
    after = compact(onnx.ModelProto.FromString(before.SerializeToString()))
    x = random_input((2, 3, 12, 12), seed=3)
    np.testing.assert_array_equal(
        runtime.run(runtime.make_session(after), {"input": x})[0],
        runtime.run(runtime.make_session(before), {"input": x})[0],
    )
    assert after.ByteSize() < before.ByteSize()
    assert not after.graph.value_info
    assert [(p.key, p.value) for p in after.graph.metadata_props] == [("owner", "team")]
    gain = next(node for node in after.graph.node if node.name == "gain")
    assert [(p.key, p.value) for p in gain.metadata_props] == [("note", "kept")], "only the exporter's provenance goes"
    attributes = {n.name: {a.name for a in n.attribute} for n in after.graph.node if n.name.startswith("conv")}
    assert "pads" in attributes["conv1"] and "strides" not in attributes["conv1"]  # 1s are the default
    assert "group" not in attributes["conv2"]


def test_generated_names_shrink_and_user_names_stay(tmp_path: Path) -> None:
    after = compact(lowered_untrimmed(model_with_float_gain(), tmp_path))
    names = {t.name for t in after.graph.initializer} | {o for n in after.graph.node for o in n.output}
    assert "gain_scale" in names, "a float initializer named like a scale is the user's"
    assert {"input", "output"} <= {v.name for v in (*after.graph.input, *after.graph.output)}
    generated = [n for n in names if n.endswith(("_zero_point", "_quantized", "_weight_scale"))]
    assert not generated
    assert "conv1_wq" in names and "input_zp" in names


def test_cli_output_is_trimmed(tmp_path: Path) -> None:
    result = compress(DEMO_ONNX, "int8", calib=DEMO_ONNX.with_suffix(".npz"), measure_latency=False, progress=False)
    path = tmp_path / "demo.int8.onnx"
    result.save(path)
    saved = onnx.load(str(path))
    assert not saved.graph.value_info, "saving must not add shapes back"
    assert path.stat().st_size == result.lowered.ByteSize()
