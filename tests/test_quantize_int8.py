"""int8: every config field, QDQ numerics vs fp32, fused lowering vs QDQ, bad input (observers: test_calibration)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import DEMO_ONNX, conv_bn_model, random_input
from onnx import TensorProto, helper

from compressor import ir as cir
from compressor import runtime
from compressor.backends import get_backend
from compressor.backends.compact import short_name
from compressor.data import Dataset
from compressor.errors import ModelError, UsageError
from compressor.metrics import compute_cost, sqnr_db, top1_agreement
from compressor.passes import import_passes
from compressor.passes.quantize_int8 import QuantizeInt8, QuantizeInt8Config
from compressor.pipeline import PassContext, Pipeline

DEMO_NPZ = DEMO_ONNX.with_suffix(".npz")
BASE = QuantizeInt8Config(bias_correction=False)


def imported(source: onnx.ModelProto | Path) -> ir.Model:
    model = cir.load_model(source) if isinstance(source, Path) else ir.serde.deserialize_model(source)
    Pipeline(import_passes()).run(model, PassContext())
    return model


def quantize(model: ir.Model, data: Path, config: QuantizeInt8Config = BASE) -> QuantizeInt8:
    quantizer = QuantizeInt8(config)
    Pipeline([quantizer]).run(model, PassContext(calibration=Dataset(data, runtime.input_specs(model))))
    return quantizer


def logits(model: ir.Model | onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return runtime.run(runtime.make_session(model), {"input": x})[0]


def initializer(model: ir.Model, suffix: str) -> list[np.ndarray]:
    return [v.const_value.numpy() for name, v in model.graph.initializers.items() if name.endswith(suffix)]


@pytest.fixture(scope="module")
def demo_x() -> np.ndarray:
    return np.load(DEMO_NPZ)["x"][:256]


class TestConfig:
    @pytest.mark.parametrize(
        "field",
        [
            {"calibration": "median"},
            {"activations": "int4"},
            {"weights": "mixed"},
            {"weight_bits": 6},
            {"percentile": 20.0},
            {"num_samples": 0},
        ],
    )
    def test_bad_values_are_usage_errors(self, field: dict) -> None:
        with pytest.raises(UsageError, match=next(iter(field))):
            QuantizeInt8Config(**field)

    def test_activation_schemes(self, small_calib: Path) -> None:
        for scheme, dtype, zero in (("symmetric_int8", np.int8, 0), ("symmetric_uint8", np.uint8, 128)):
            model = imported(conv_bn_model())
            quantize(model, small_calib, replace(BASE, activations=scheme))
            zeros = [z for n, z in ((n, v.const_value) for n, v in model.graph.initializers.items()) if n.endswith(
                "_zero_point") and "weight" not in n and "bias" not in n]  # fmt: skip
            assert zeros and all(z.dtype == ir.DataType.from_numpy(np.dtype(dtype)) for z in zeros)
            assert all(int(z.numpy()) == zero for z in zeros)

    def test_weight_bits_and_per_channel(self, small_calib: Path) -> None:
        for bits, limit in ((7, 63), (8, 127)):
            model = imported(conv_bn_model())
            quantize(model, small_calib, replace(BASE, weight_bits=bits))
            weights = initializer(model, "_weight_quantized")
            assert max(int(np.abs(w).max()) for w in weights) == limit
            assert all(s.ndim == 1 for s in initializer(model, "_weight_scale"))  # per channel
        model = imported(conv_bn_model())
        quantize(model, small_calib, replace(BASE, per_channel=False))
        assert all(s.ndim == 0 for s in initializer(model, "_weight_scale"))

    def test_per_tensor_where_weights_allow(self, small_calib: Path, demo_x: np.ndarray) -> None:
        scales = {}
        for threshold in (None, 0.0, float("inf")):
            model = imported(conv_bn_model())
            quantize(model, small_calib, replace(BASE, per_tensor_min_sqnr_db=threshold))
            scales[threshold] = [s.ndim for s in initializer(model, "_weight_scale")]
        assert scales[None] == scales[float("inf")] == [1, 1, 1]  # per channel unless one scale is good enough
        assert scales[0.0] == [0, 0, 0]
        model = imported(DEMO_ONNX)
        reference = logits(model, demo_x)
        quantize(model, DEMO_NPZ, replace(BASE, weight_bits=8, per_tensor_min_sqnr_db=40.0))
        chosen = [s.ndim for s in initializer(model, "_weight_scale")]
        assert 0 in chosen and 1 in chosen, "the demo has layers on both sides of 40 dB"
        assert sqnr_db(reference, logits(model, demo_x)) >= 28

    def test_asymmetric_weights_and_power_of_two(self, small_calib: Path) -> None:
        model = imported(conv_bn_model())
        quantize(model, small_calib, replace(BASE, weights="asymmetric", power_of_two=True))
        assert any(np.any(z != 0) for z in initializer(model, "_weight_zero_point"))
        for scale in initializer(model, "_scale"):
            exponent = np.log2(scale[scale > 0])
            assert np.allclose(exponent, np.round(exponent)), "scales must be powers of two"

    def test_keep_float_and_bias(self, small_calib: Path) -> None:
        model = imported(conv_bn_model())
        quantizer = quantize(model, small_calib, replace(BASE, keep_float=frozenset({"conv2"})))
        assert quantizer.skipped == {"conv2": "kept in float by configuration"}
        conv2 = next(n for n in model.graph if n.name == "conv2")
        assert conv2.inputs[1].const_value is not None  # weight still float
        conv1 = next(n for n in model.graph if n.name == "conv1")
        bias_dq = conv1.inputs[2].producer()
        assert bias_dq.op_type == "DequantizeLinear" and bias_dq.inputs[0].dtype == ir.DataType.INT32
        weight_scale = conv1.inputs[1].producer().inputs[1].const_value.numpy()
        input_scale = float(conv1.inputs[0].producer().inputs[1].const_value.numpy())
        np.testing.assert_allclose(bias_dq.inputs[1].const_value.numpy(), input_scale * weight_scale, rtol=1e-6)

    def test_num_samples_and_batch_size(self, small_calib: Path) -> None:
        scales = {}
        for samples, batch in ((32, 8), (32, 3), (2, 8)):
            model = imported(conv_bn_model())
            quantize(model, small_calib, replace(BASE, num_samples=samples, batch_size=batch))
            scales[samples, batch] = np.concatenate([s.ravel() for s in initializer(model, "_scale")])
        np.testing.assert_array_equal(scales[32, 8], scales[32, 3])  # min/max does not depend on batching
        assert not np.array_equal(scales[32, 8], scales[2, 8])


@pytest.mark.parametrize(("method", "floor_db"), [("minmax", 30), ("moving_average", 25), ("percentile", 28),
                                                   ("mse", 30), ("entropy", 15)])  # fmt: skip
def test_demo_numerics_per_calibration_method(method: str, floor_db: float, demo_x: np.ndarray) -> None:
    model = imported(DEMO_ONNX)
    reference = logits(model, demo_x)
    quantize(model, DEMO_NPZ, replace(BASE, calibration=method))
    quantized = logits(model, demo_x)
    assert sqnr_db(reference, quantized) >= floor_db
    assert top1_agreement(reference, quantized) >= (0.95 if method == "entropy" else 0.985)


def quantized_tensor_outputs(proto: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    del proto.graph.output[:]
    for name in names:
        proto.graph.output.append(onnx.ValueInfoProto(name=name))
    return proto


def test_fused_lowering_is_within_one_step_of_qdq(demo_x: np.ndarray) -> None:
    model = imported(DEMO_ONNX)
    quantize(model, DEMO_NPZ)
    qdq = cir.to_proto(model)
    backend = get_backend("cpu")
    fused = backend.lower(model)
    assert backend.rejected == {}
    ops = {n.op_type for n in fused.graph.node}
    assert {"QLinearConv", "QLinearAdd", "QLinearGlobalAveragePool", "QGemm"} <= ops
    assert not ops & {"Conv", "Relu", "DequantizeLinear", "Gemm"}
    quantized_names = [n.output[0] for n in qdq.graph.node if n.op_type == "QuantizeLinear"]
    in_fused = {o for n in fused.graph.node for o in n.output}
    shared = [name for name in quantized_names if short_name(name) in in_fused]  # the lowering shortens names
    assert len(shared) >= 6
    a = runtime.run(runtime.make_session(quantized_tensor_outputs(qdq, shared)), {"input": demo_x})
    fused_names = [short_name(name) for name in shared]
    b = runtime.run(runtime.make_session(quantized_tensor_outputs(fused, fused_names)), {"input": demo_x})
    for name, x, y in zip(shared, a, b, strict=True):
        steps = np.abs(x.astype(np.int32) - y.astype(np.int32)).max()
        assert steps <= 1, f"{name} differs by {steps} quantization steps"
    assert sqnr_db(logits(qdq, demo_x), logits(fused, demo_x)) > 40
    # MACs are still counted through the contrib ops that ONNX shape inference cannot see
    assert compute_cost(fused).macs == compute_cost(onnx.load(DEMO_ONNX)).macs


def test_constant_pad_runs_on_the_integer_tensor(small_calib: Path) -> None:
    proto = conv_bn_model(identity=False)
    relu = next(n for n in proto.graph.node if n.op_type == "Relu")
    conv2 = next(n for n in proto.graph.node if n.name == "conv2")
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"))
    proto.graph.node.insert(
        list(proto.graph.node).index(conv2), helper.make_node("Pad", ["r1", "pads"], ["padded"], name="pad")
    )
    conv2.input[0] = "padded"
    del conv2.attribute[:]  # the Pad now supplies the border
    assert relu.output[0] == "r1"
    model = imported(proto)
    quantize(model, small_calib, replace(BASE, min_sqnr_db=None))
    backend = get_backend("cpu")
    fused = backend.lower(model)
    pad = next(n for n in fused.graph.node if n.op_type == "Pad")
    producer = next(n for n in fused.graph.node if pad.input[0] in n.output)
    assert producer.op_type == "QLinearConv" and backend.rejected == {}
    x = random_input((8, 3, 8, 8), seed=3)
    assert sqnr_db(logits(cir.to_proto(model), x), logits(fused, x)) > 40


def split_model() -> onnx.ModelProto:
    """`conv_bn_model` with relu1's channels split in two halves and concatenated back swapped."""
    proto = conv_bn_model(identity=False)
    conv2 = next(n for n in proto.graph.node if n.name == "conv2")
    at = list(proto.graph.node).index(conv2)
    proto.graph.node.insert(at, helper.make_node("Concat", ["hi", "lo"], ["swapped"], name="concat", axis=1))
    proto.graph.node.insert(at, helper.make_node("Split", ["r1"], ["lo", "hi"], name="split", axis=1, num_outputs=2))
    conv2.input[0] = "swapped"
    proto.opset_import[0].version = 18
    return proto


def test_split_runs_on_the_integer_tensor(small_calib: Path) -> None:
    model = imported(split_model())
    quantize(model, small_calib, replace(BASE, min_sqnr_db=None))
    qdq = cir.to_proto(model)
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in qdq.graph.initializer}
    split = next(n for n in qdq.graph.node if n.op_type == "Split")
    source = next(n for n in qdq.graph.node if n.output[0] == split.input[0])
    assert source.op_type == "DequantizeLinear"
    halves = [n for n in qdq.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in split.output]
    assert len(halves) == 2
    for half in halves:  # the halves share the split input's params, so the integer Split is exact
        assert constants[half.input[1]] == constants[source.input[1]]
        assert constants[half.input[2]] == constants[source.input[2]]
    backend = get_backend("cpu")
    fused = backend.lower(model)
    split = next(n for n in fused.graph.node if n.op_type == "Split")
    producer = next(n for n in fused.graph.node if split.input[0] in n.output)
    assert producer.op_type == "QLinearConv" and backend.rejected == {}
    assert "DequantizeLinear" not in {n.op_type for n in fused.graph.node}
    x = random_input((8, 3, 8, 8), seed=3)
    assert sqnr_db(logits(qdq, x), logits(fused, x)) > 40
    assert sqnr_db(logits(split_model(), x), logits(fused, x)) > 25


def test_qdq_format_is_kept_on_request(small_calib: Path) -> None:
    model = imported(conv_bn_model())
    quantize(model, small_calib)
    lowered = get_backend("cpu", qdq=True).lower(model)
    assert "QLinearConv" not in {n.op_type for n in lowered.graph.node}
    assert "QuantizeLinear" in {n.op_type for n in lowered.graph.node}


class TestBadInput:
    def test_already_quantized_model_is_refused(self, small_calib: Path) -> None:
        model = imported(conv_bn_model())
        quantize(model, small_calib)
        with pytest.raises(ModelError, match="already quantized"):
            quantize(model, small_calib)

    def test_model_without_quantizable_ops_is_a_no_op(self, tmp_path: Path) -> None:
        graph = helper.make_graph(
            [helper.make_node("Softmax", ["input"], ["out"], axis=1)],
            "soft",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
            [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])],
        )
        model = imported(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
        np.savez(tmp_path / "c.npz", x=random_input((4, 4)))
        records = Pipeline([QuantizeInt8(BASE)]).run(
            model, PassContext(calibration=Dataset(tmp_path / "c.npz", runtime.input_specs(model)))
        )
        assert records[0].modified is False

    def test_unknown_ops_stay_float(self, small_calib: Path) -> None:
        proto = conv_bn_model(identity=False)
        relu = next(n for n in proto.graph.node if n.op_type == "Relu")
        relu.op_type, relu.name = "LRN", "lrn"
        relu.attribute.append(helper.make_attribute("size", 3))
        model = imported(proto)
        x = random_input((16, 3, 8, 8), seed=2)
        reference = logits(model, x)
        quantizer = quantize(model, small_calib)
        assert quantizer.skipped == {"lrn": "LRN has no int8 form here: runs in float"}  # listed in the report
        assert "LRN" in {n.op_type for n in model.graph}
        assert sqnr_db(reference, logits(model, x)) > 25
        assert sqnr_db(reference, logits(get_backend("cpu").lower(model), x)) > 25

    def test_old_opset_model_quantizes_per_channel(self, small_calib: Path) -> None:
        model = imported(conv_bn_model(opset=11))
        quantize(model, small_calib)
        proto = cir.to_proto(model)
        onnx.checker.check_model(proto)
        assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 13


def test_variants_reuse_the_quantized_weights(small_calib: Path) -> None:
    model = imported(conv_bn_model())
    quantizer = quantize(model, small_calib, BASE)
    memo = quantizer.calibrated.weights
    assert len(memo) == 3  # two Convs and the Gemm
    assert all(not q.flags.writeable for q, *_ in memo.values())
    again = quantizer.variant(frozenset())
    assert len(memo) == 3, "a variant quantized a weight again"
    assert cir.to_proto(again).SerializeToString() == cir.to_proto(model).SerializeToString()
