"""ConvTranspose in int8: per-channel weights on axis 1 (per group), int32 biases, and the CPU lowering's float form."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import float_model, random_input
from onnx import TensorProto, helper, numpy_helper
from test_quantize_int8 import BASE, imported, logits, quantize

from compressor import compress, runtime
from compressor import ir as cir
from compressor.backends import get_backend
from compressor.data import Dataset
from compressor.metrics import sqnr_db
from compressor.passes.quantize_int8 import QuantizeInt8Config
from compressor.quantization.sensitivity import layer_sensitivity


def decoder_model() -> onnx.ModelProto:
    """input[N,4,16,16] -> Conv stride 2 -> Relu -> ConvTranspose stride 2 -> Relu -> ConvTranspose group 3 -> Conv."""
    rng = np.random.default_rng(0)

    def weight(name: str, shape: tuple[int, ...], std: float = 0.3) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0, std, shape).astype(np.float32), name)

    inits = [weight("w1", (8, 4, 3, 3)), weight("b1", (8,), 0.1), weight("w2", (8, 6, 4, 4)), weight("b2", (6,), 0.1),
             weight("w3", (6, 2, 3, 3)), weight("b3", (6,), 0.1), weight("w4", (3, 6, 1, 1))]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="down", strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("ConvTranspose", ["r1", "w2", "b2"], ["c2"], name="up", strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("ConvTranspose", ["r2", "w3", "b3"], ["c3"], name="grouped_up", group=3, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c3", "w4"], ["output"], name="head"),
    ]
    return float_model("decoder", nodes, inits, (["batch", 4, 16, 16], ["batch", 3, 16, 16]))


@pytest.fixture
def calib(tmp_path: Path) -> Path:
    path = tmp_path / "calib.npz"
    np.savez(path, x=random_input((32, 4, 16, 16), seed=1))
    return path


def node(model: ir.Model, name: str) -> ir.Node:
    return next(n for n in model.graph if n.name == name)


def constant(value: ir.Value) -> np.ndarray:
    return value.const_value.numpy()


def test_weights_per_channel_on_axis_1_and_biases_int32(calib: Path) -> None:
    model = imported(decoder_model())
    quantize(model, calib)
    for name, per_group, groups in (("up", 6, 1), ("grouped_up", 2, 3)):
        conv = node(model, name)
        weight_dq, bias_dq, input_dq = (conv.inputs[i].producer() for i in (1, 2, 0))
        assert weight_dq.op_type == bias_dq.op_type == input_dq.op_type == "DequantizeLinear"
        assert weight_dq.attributes["axis"].as_int() == 1
        q, scale = constant(weight_dq.inputs[0]), constant(weight_dq.inputs[1])
        assert q.dtype == np.int8 and scale.shape == (per_group,)
        qmax = 2 ** (BASE.weight_bits - 1) - 1
        np.testing.assert_array_equal(np.abs(q).max(axis=(0, 2, 3)), qmax)  # each channel uses its own full range
        bias_q, bias_scale = constant(bias_dq.inputs[0]), constant(bias_dq.inputs[1])
        assert bias_q.dtype == np.int32 and bias_q.shape == (6,)
        expected = constant(input_dq.inputs[1]).astype(np.float64) * np.tile(scale, groups)
        np.testing.assert_allclose(bias_scale, expected, rtol=1e-6)


def test_qdq_and_lowered_numerics(calib: Path) -> None:
    reference_model = decoder_model()
    x = random_input((16, 4, 16, 16), seed=2)
    reference = logits(reference_model, x)
    model = imported(reference_model)
    quantize(model, calib)
    qdq = logits(model, x)
    assert sqnr_db(reference, qdq) > 25
    backend = get_backend("cpu")
    lowered = backend.lower(model)
    for name in ("up", "grouped_up"):
        assert "no int8 ConvTranspose" in backend.rejected[name]
        conv = next(n for n in lowered.graph.node if n.name == name)
        producers = {output: n.op_type for n in lowered.graph.node for output in n.output}
        assert producers[conv.input[1]] == "Mul", "the int8 weight is stored, dequantized by a Cast and Mul at load"
    fused = logits(lowered, x)
    assert sqnr_db(qdq, fused) > 40
    assert sqnr_db(reference, fused) > 25


def test_bias_correction_and_its_statistics_skip_conv_transpose(calib: Path) -> None:
    model = imported(decoder_model())
    quantizer = quantize(model, calib, QuantizeInt8Config(bias_correction=True))
    assert set(quantizer.calibrated.means) == {"input", "c3"}  # the Convs' inputs, not the ConvTransposes'
    assert "down" in quantizer.corrected and "up" not in quantizer.corrected


def test_sensitivity_counts_transposed_macs(calib: Path) -> None:
    model = imported(decoder_model())
    ranked = {layer.node: layer for layer in layer_sensitivity(model, Dataset(calib, runtime.input_specs(model)))}
    assert ranked["up"].macs == (8 * 8 * 8) * (6 * 4 * 4)  # every input value feeds C_out/group * k*k outputs
    assert ranked["grouped_up"].macs == (6 * 16 * 16) * (2 * 3 * 3)
    assert all(layer.sqnr_db > 25 for layer in ranked.values())


def test_compress_reports_and_stores_conv_transpose_int8(calib: Path, tmp_path: Path) -> None:
    source = tmp_path / "decoder.onnx"
    onnx.save(decoder_model(), source)
    result = compress(source, target="int8", calib=calib, measure_latency=False, latency_guard=False)
    assert "no int8 ConvTranspose" in result.report.kept_float["up"]
    stored = {t.name: t.data_type for t in result.lowered.graph.initializer}
    producers = {output: n for n in result.lowered.graph.node for output in n.output}
    for name in ("up", "grouped_up"):
        conv = next(n for n in result.lowered.graph.node if n.name == name)
        cast = producers[producers[conv.input[1]].input[0]]
        assert cast.op_type == "Cast" and stored[cast.input[0]] == TensorProto.INT8
    assert result.report.rows[0].label == "size" and result.report.rows[0].ratio > 1.3
    x = random_input((8, 4, 16, 16), seed=3)
    assert sqnr_db(logits(decoder_model(), x), logits(result.lowered, x)) > 25
    assert cir.to_proto(result.model).graph.node  # the IR result serializes
