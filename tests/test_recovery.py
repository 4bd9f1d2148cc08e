"""int8 accuracy recovery without training: cross-layer equalization, bias correction, sensitivity, mixed precision."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import DEMO_ONNX, assert_close, random_input, run_onnx
from onnx import TensorProto, helper, numpy_helper

from compressor import cli, runtime
from compressor import ir as cir
from compressor.api import compress
from compressor.data import Dataset
from compressor.metrics import compute_cost, sqnr_db
from compressor.passes import import_passes
from compressor.passes.equalize_cross_layer import EqualizeCrossLayer
from compressor.passes.quantize_int8 import QuantizeInt8, QuantizeInt8Config, calibrate
from compressor.pipeline import PassContext, Pipeline
from compressor.quantization.sensitivity import MixedPrecision, layer_sensitivity

DEMO_NPZ = DEMO_ONNX.with_suffix(".npz")
PLAIN = QuantizeInt8Config(bias_correction=False, min_sqnr_db=None, equalize=False)


def conv_chain(
    activations: list[str | None], channels: list[int], groups: list[int] | None = None, seed: int = 0
) -> onnx.ModelProto:
    """input[N, c0, 8, 8] -> Conv -> act -> Conv -> act ... (3x3, pad 1) -> output; ``activations[i]`` after Conv i.

    An activation is "relu", "relu6" (Clip with Constant bounds 0 and 6) or None. Output channel 0 of
    every Conv is scaled up 40x and channel 1 down 20x, so the channel ranges are badly imbalanced.
    """
    rng = np.random.default_rng(seed)
    groups = groups or [1] * len(activations)
    nodes, inits, value = [], [], "input"
    for i, (act, group) in enumerate(zip(activations, groups, strict=True)):
        weight = rng.uniform(-1, 1, (channels[i + 1], channels[i] // group, 3, 3)).astype(np.float32)
        weight[0] *= 40.0
        weight[1] /= 20.0
        bias = rng.uniform(-1, 1, channels[i + 1]).astype(np.float32)
        inits += [numpy_helper.from_array(weight, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
        conv_inputs = [value, f"w{i}", f"b{i}"]
        nodes.append(helper.make_node("Conv", conv_inputs, [f"c{i}"], name=f"conv{i}", pads=[1] * 4, group=group))
        value = f"c{i}"
        if act == "relu":
            nodes.append(helper.make_node("Relu", [value], [f"a{i}"], name=f"relu{i}"))
            value = f"a{i}"
        elif act == "relu6":
            for bound, number in (("lo", 0.0), ("hi", 6.0)):
                constant = numpy_helper.from_array(np.array(number, np.float32))
                nodes.append(helper.make_node("Constant", [], [f"{bound}{i}"], value=constant))
            nodes.append(helper.make_node("Clip", [value, f"lo{i}", f"hi{i}"], [f"a{i}"], name=f"clip{i}"))
            value = f"a{i}"
    nodes.append(helper.make_node("Identity", [value], ["output"], name="out"))
    graph = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels[0], 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", channels[-1], 8, 8])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def imported(source: onnx.ModelProto | Path) -> ir.Model:
    model = cir.load_model(source) if isinstance(source, Path) else ir.serde.deserialize_model(source)
    Pipeline(import_passes()).run(model, PassContext())
    return model


def weight(model: ir.Model, node: str) -> np.ndarray:
    return next(n for n in model.graph if n.name == node).inputs[1].const_value.numpy()


def feeds(channels: int, scale: float = 1.0, seed: int = 0) -> dict[str, np.ndarray]:
    return {"input": scale * random_input((4, channels, 8, 8), seed=seed)}


class TestEqualizeCrossLayer:
    def test_balances_ranges_and_keeps_outputs(self) -> None:
        proto = conv_chain(["relu", None], [3, 8, 6])
        model = imported(proto)
        before = np.abs(weight(model, "conv0")).reshape(8, -1).max(1)
        equalize = EqualizeCrossLayer()
        assert equalize(model).modified
        assert equalize.equalized == {"conv0 -> conv1": 8}
        r1 = np.abs(weight(model, "conv0")).reshape(8, -1).max(1)
        r2 = np.abs(weight(model, "conv1")).max(axis=(0, 2, 3))
        np.testing.assert_allclose(r1, r2, rtol=1e-5)  # each channel's two ranges now meet at sqrt(r1 r2)
        assert r1.max() / r1.min() < before.max() / before.min() / 10
        for scale in (1.0, 50.0):
            assert_close(run_onnx(proto, feeds(3, scale)), run_onnx(model, feeds(3, scale)), rtol=1e-5)

    def test_depthwise_then_pointwise_chain(self) -> None:
        proto = conv_chain(["relu", "relu", None], [8, 8, 8, 4], groups=[1, 8, 1])
        model = imported(proto)
        equalize = EqualizeCrossLayer()
        equalize(model)
        assert set(equalize.equalized) == {"conv0 -> conv1", "conv1 -> conv2"}
        r1 = np.abs(weight(model, "conv1")).reshape(8, -1).max(1)  # depthwise: one input channel per output
        r2 = np.abs(weight(model, "conv2")).max(axis=(0, 2, 3))
        np.testing.assert_allclose(r1, r2, rtol=1e-2)  # a chain converges iteratively
        assert_close(run_onnx(proto, feeds(8)), run_onnx(model, feeds(8)), rtol=1e-5)

    def test_no_pair_is_a_no_op(self) -> None:
        model = imported(conv_chain([None], [3, 4]))
        equalize = EqualizeCrossLayer()
        assert equalize(model).modified is False
        assert equalize.rejections == [] and equalize.equalized == {}

    def test_clip_pair_with_unbounded_input_is_rejected_with_reason(self) -> None:
        proto = conv_chain(["relu6", None], [3, 8, 6])
        model = imported(proto)
        original = weight(model, "conv0").copy()
        equalize = EqualizeCrossLayer()
        assert equalize(model).modified is False
        assert any("conv0 -> conv1: Clip(0, 6) is not scale-equivariant" in r for r in equalize.rejections)
        np.testing.assert_array_equal(weight(model, "conv0"), original)

    def test_clip_pair_is_equalized_where_provably_safe(self) -> None:
        proto = conv_chain(["relu6", "relu6", None], [3, 4, 4, 4])
        w1 = next(t for t in proto.graph.initializer if t.name == "w1")
        small = numpy_helper.to_array(w1) * 0.01  # conv1 reads [0, 6]: its pre-activation stays below 6
        w1.CopyFrom(numpy_helper.from_array(small.astype(np.float32), "w1"))
        b1 = next(t for t in proto.graph.initializer if t.name == "b1")
        b1.CopyFrom(numpy_helper.from_array(np.zeros(4, np.float32), "b1"))
        model = imported(proto)
        equalize = EqualizeCrossLayer()
        assert equalize(model).modified
        assert "conv1 -> conv2" in equalize.equalized and "conv0 -> conv1" not in equalize.equalized
        for scale in (1.0, 100.0):  # the first Clip binds hard at 100x; the proof does not depend on the data
            assert_close(run_onnx(proto, feeds(3, scale)), run_onnx(model, feeds(3, scale)), rtol=1e-5)

    def test_demo_model_numerics(self) -> None:
        model = imported(DEMO_ONNX)
        reference = cir.to_proto(model)
        equalize = EqualizeCrossLayer()
        assert equalize(model).modified and len(equalize.equalized) == 2
        x = {"input": np.load(DEMO_NPZ)["x"][:64]}
        assert_close(run_onnx(reference, x), run_onnx(model, x), rtol=1e-5)

    def test_non_constant_weight_is_rejected(self) -> None:
        proto = conv_chain(["relu", None], [3, 4, 4])
        w1 = next(t for t in proto.graph.initializer if t.name == "w1")
        proto.graph.initializer.remove(w1)
        proto.graph.input.append(helper.make_tensor_value_info("w1", TensorProto.FLOAT, [4, 4, 3, 3]))
        model = imported(proto)
        equalize = EqualizeCrossLayer()
        assert equalize(model).modified is False
        assert equalize.rejections == ["conv0 -> conv1: weight of conv1 is not constant"]


def quantized_logits(config: QuantizeInt8Config, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    model = imported(DEMO_ONNX)
    reference = runtime.run(runtime.make_session(model), {"input": x})[0]
    context = PassContext(calibration=Dataset(DEMO_NPZ, runtime.input_specs(model)))
    Pipeline([QuantizeInt8(config)]).run(model, context)
    return reference, runtime.run(runtime.make_session(model), {"input": x})[0]


class TestBiasCorrection:
    def test_removes_the_first_convs_mean_shift_on_the_demo(self) -> None:
        # Measured where it acts: at the logits the effect of correcting every layer's pre-activation mean
        # is a matter of chance on this small net (between -4.7 and +2.7 dB across weight settings).
        x = np.load(DEMO_NPZ)["x"][:256]
        first_conv_outputs = {}
        for correct in (None, False, True):
            model = imported(DEMO_ONNX)
            if correct is not None:
                context = PassContext(calibration=Dataset(DEMO_NPZ, runtime.input_specs(model)))
                Pipeline([QuantizeInt8(replace(PLAIN, bias_correction=correct))]).run(model, context)
            conv = next(node for node in model.graph if node.op_type == "Conv")
            model.graph.outputs.append(conv.outputs[0])
            first_conv_outputs[correct] = runtime.run(runtime.make_session(model), {"input": x})[-1]
        inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))  # padding borders see zeros, not the mean
        shift = {c: np.abs((first_conv_outputs[c] - first_conv_outputs[None])[inner].mean(axis=(0, 2, 3))).mean()
                 for c in (False, True)}  # fmt: skip
        assert shift[True] < 0.2 * shift[False], shift

    def test_grouped_conv_without_bias_gets_a_corrected_bias(self, tmp_path: Path) -> None:
        proto = conv_chain([None], [8, 16], groups=[4])
        conv = proto.graph.node[0]
        del conv.input[2]  # no bias: the correction creates one
        x = random_input((64, 8, 8, 8), seed=3) + 1.0  # a non-zero input mean makes weight errors shift outputs
        np.savez(tmp_path / "calib.npz", x=x)
        errors = {}
        for correct in (False, True):
            model = imported(proto)
            context = PassContext(calibration=Dataset(tmp_path / "calib.npz", runtime.input_specs(model)))
            quantize = QuantizeInt8(replace(PLAIN, bias_correction=correct))
            Pipeline([quantize]).run(model, context)
            output = runtime.run(runtime.make_session(model), {"input": x})[0]
            inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))  # padding borders see zeros, not the mean
            errors[correct] = np.abs((output - run_onnx(proto, {"input": x})[0])[inner].mean(axis=(0, 2, 3)))
        assert set(quantize.corrected) == {"conv0"}
        assert errors[True].max() < 0.2 * errors[False].max()

    def test_precomputed_stats_give_the_same_model(self) -> None:
        model_a, model_b = imported(DEMO_ONNX), imported(DEMO_ONNX)
        dataset = Dataset(DEMO_NPZ, runtime.input_specs(model_a))
        config = replace(PLAIN, bias_correction=True)
        Pipeline([QuantizeInt8(config)]).run(model_a, PassContext(calibration=dataset))
        QuantizeInt8(config, stats=calibrate(model_b, dataset, config))(model_b)
        for name, value in model_a.graph.initializers.items():
            other = model_b.graph.initializers[name].const_value.numpy()
            np.testing.assert_array_equal(value.const_value.numpy(), other)


def test_sensitivity_has_one_sorted_entry_per_compute_node() -> None:
    model = imported(DEMO_ONNX)
    compute = [n.name for n in model.graph if n.op_type in ("Conv", "Gemm", "MatMul")]
    ranked = layer_sensitivity(model, Dataset(DEMO_NPZ, runtime.input_specs(model)), PLAIN, samples=16)
    assert sorted(r.node for r in ranked) == sorted(compute)
    assert [r.sqnr_db for r in ranked] == sorted(r.sqnr_db for r in ranked)
    assert all(np.isfinite(r.sqnr_db) and r.sqnr_db > 20 for r in ranked)
    assert {r.op for r in ranked} == {"Conv", "Gemm"}
    assert sum(r.macs for r in ranked) == compute_cost(model).macs


def test_explain_prints_the_table_and_reports_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "report.json"
    argv = ["--demo", "--target", "int8", "--explain", "3", "--no-latency", "-o", str(tmp_path / "d.onnx")]
    assert cli.main([*argv, "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "most sensitive layers" in out and "| 3 | " in out and "| 4 | " not in out
    record = json.loads(report.read_text())["passes"][-1]
    assert record["name"] == "quantize_int8" and len(record["sensitivity"]) == 6
    assert cli.main(["--demo", "--explain", "-o", str(tmp_path / "f.onnx")]) == 2  # int8 only


def broken_layer_model() -> tuple[onnx.ModelProto, np.ndarray]:
    """conv_a reads a near-silent input channel through a 100x weight: harmless in float, fatal in int8."""
    proto = conv_chain(["relu", "relu"], [4, 8, 8], seed=1)
    w0 = next(t for t in proto.graph.initializer if t.name == "w0")
    array = np.random.default_rng(2).uniform(-1, 1, (8, 4, 3, 3)).astype(np.float32)
    array[:, 3, 1, 1] = 100.0  # one tap per output channel sets the per-channel scale
    w0.CopyFrom(numpy_helper.from_array(array, "w0"))
    x = random_input((64, 4, 8, 8), seed=4)
    x[:, 3] *= 1e-4
    return proto, x


def test_default_int8_keeps_a_broken_layer_in_float(tmp_path: Path) -> None:
    proto, x = broken_layer_model()
    np.savez(tmp_path / "calib.npz", x=x)
    calib = tmp_path / "calib.npz"
    fixed_speed = {"measure_latency": False, "latency_guard": False}  # timing must not change what is tested
    off = compress(proto, "int8", calib=calib, int8={"min_sqnr_db": None}, **fixed_speed)
    result = compress(proto, "int8", calib=calib, **fixed_speed)
    assert result.report.kept_float["conv0"].startswith("sensitivity: ")
    assert "dB alone" in result.report.kept_float["conv0"]
    reference = run_onnx(proto, {"input": x})[0]
    fixed = runtime.run(runtime.make_session(result.lowered), {"input": x})[0]
    broken = runtime.run(runtime.make_session(off.lowered), {"input": x})[0]
    assert sqnr_db(reference, broken) < 10 < 30 < sqnr_db(reference, fixed)
    history = result.report.passes[-1]["mixed_precision"]
    assert history[0]["kept_float"] == [] and history[-1]["kept_float"] == ["conv0"]


def test_mixed_precision_is_off_without_a_target() -> None:
    model = imported(DEMO_ONNX)
    dataset = Dataset(DEMO_NPZ, runtime.input_specs(model))
    config = replace(PLAIN, num_samples=32)
    choose = MixedPrecision(dataset=dataset)
    assert choose(model, calibrate(model, dataset, config), config) == {}
    assert choose.sensitivity == [] and len(choose.history) == 1


def test_report_reuses_calibration_outputs_as_the_fp32_reference(tmp_path: Path) -> None:
    """Without --eval the report compares against fp32 outputs kept from calibration: same numbers."""
    result = compress(DEMO_ONNX, "int8", calib=DEMO_NPZ, measure_latency=False, latency_guard=False)
    x = np.load(DEMO_NPZ)["x"][: result.report.evaluation["samples"]]
    reference = run_onnx(onnx.load(DEMO_ONNX), {"input": x})[0]
    compressed = runtime.run(runtime.make_session(result.lowered), {"input": x})[0]
    reported = next(row.compressed for row in result.report.rows if row.label == "SQNR vs fp32")
    assert result.report.evaluation == {**result.report.evaluation, "source": "calib", "samples": 128}
    assert reported == pytest.approx(sqnr_db(reference, compressed), abs=0.01)
