"""The INT16 DFP pass and its two lowerings: onnxruntime's int16 QDQ against the integer reference."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import compressor
from benchmarks import zoo
from compressor.backends.integer_reference import IntegerReference
from compressor.errors import ModelError
from compressor.metrics import sqnr_db
from tests.conftest import float_model, random_input, run_onnx

DEMO = Path(compressor.__file__).parent / "demo"


def int16(model: onnx.ModelProto | Path | str, calib: Path | str, **options: object) -> compressor.Result:
    return compressor.compress(
        model, target="int16", calib=calib, measure_latency=False, measure_fidelity=False, progress=False, **options
    )


def output_step(model: onnx.ModelProto, index: int = 0) -> float:
    """The scale of the DequantizeLinear that writes graph output ``index``: one step of its int16 mantissas."""
    node = next(n for n in model.graph.node if n.output[0] == model.graph.output[index].name)
    assert node.op_type == "DequantizeLinear"
    return float(next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == node.input[1]))


def exposed(model: onnx.ModelProto, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """onnxruntime's value of every int16 tensor (QuantizeLinear outputs) of ``model`` on ``x``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = [n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.INT16, None) for n in names)
    values = run_onnx(probe, x)[len(model.graph.output) :]
    return dict(zip(names, values, strict=True))


def tiny_conv_net(opset: int = 17) -> onnx.ModelProto:
    """Grouped, strided, padded, dilated Conv with bias -> Relu -> MaxPool -> Clip -> GAP -> Gemm, plus a residual Add
    and a Concat, on a symbolic batch."""
    rng = np.random.default_rng(0)

    def init(name: str, *shape: int, scale: float = 0.3) -> TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], group=2, pads=[2] * 4, dilations=[2, 2], name="conv2"),
        helper.make_node("Add", ["c2", "r1"], ["a1"], name="add"),
        helper.make_node("MaxPool", ["a1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        helper.make_node("Clip", ["p1", "low", "high"], ["k1"], name="clip"),
        helper.make_node("Conv", ["k1", "w3"], ["c3"], strides=[2, 2], pads=[0, 0, 1, 1], name="conv3"),
        helper.make_node("Concat", ["c3", "c3"], ["cat"], axis=1, name="concat"),
        helper.make_node("AveragePool", ["cat"], ["ap"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="avg"),
        helper.make_node("GlobalAveragePool", ["ap"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["output"], transB=1, name="fc"),
    ]
    inits = [
        init("w1", 8, 3, 3, 3), init("b1", 8), init("w2", 8, 4, 3, 3), init("b2", 8), init("w3", 6, 8, 3, 3),
        init("wf", 5, 12), init("bf", 5),
        numpy_helper.from_array(np.array(0.0, np.float32), "low"),
        numpy_helper.from_array(np.array(2.0, np.float32), "high"),
    ]  # fmt: skip
    return float_model("tiny", nodes, inits, (["N", 3, 12, 12], ["N", 5]), opset=opset)


@pytest.fixture
def tiny_calib(tmp_path: Path) -> Path:
    path = tmp_path / "calib.npz"
    np.savez(path, x=random_input((64, 3, 12, 12), seed=3))
    return path


def test_the_int16_form_is_valid_opset_21_qdq_with_power_of_two_scales(tiny_calib: Path) -> None:
    lowered = int16(tiny_conv_net(), tiny_calib).lowered
    onnx.checker.check_model(lowered, full_check=True)
    assert next(o.version for o in lowered.opset_import if o.domain in ("", "ai.onnx")) >= 21
    inits = {t.name: numpy_helper.to_array(t) for t in lowered.graph.initializer}
    dequantized = [n for n in lowered.graph.node if n.op_type == "DequantizeLinear"]
    assert dequantized and all(n.op_type != "Conv" or n.input[0].endswith("_dfp") for n in lowered.graph.node)
    for node in [*dequantized, *(n for n in lowered.graph.node if n.op_type == "QuantizeLinear")]:
        scale = inits[node.input[1]]
        zero = inits[node.input[2]] if len(node.input) > 2 else np.zeros((), np.int16)  # weights: the default 0
        assert np.all(np.frexp(scale)[0] == 0.5), f"{node.name}: scale is not a power of two"
        assert np.all(zero == 0) and zero.dtype == np.int16
    weights = [inits[n.input[0]] for n in dequantized if n.input[0] in inits]
    assert {w.dtype for w in weights} == {np.dtype(np.int16), np.dtype(np.int32)}  # int16 weights, int32 biases
    floats = [t for t in lowered.graph.initializer if t.data_type == TensorProto.FLOAT and np.prod(t.dims) > 8]
    assert not floats  # no float weights left, only scales
    assert lowered.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"  # symbolic batch kept


def test_int16_matches_fp32_and_the_integer_reference_on_a_hand_built_net(tiny_calib: Path) -> None:
    model = tiny_conv_net()
    lowered = int16(model, tiny_calib).lowered
    x = {"input": np.load(tiny_calib)["x"][:16]}  # inside the calibrated ranges: nothing saturates
    (expected,) = run_onnx(model, x)
    (got,) = run_onnx(lowered, x)
    assert sqnr_db(expected, got) >= 70.0
    reference = IntegerReference(lowered)
    (oracle,) = reference.run(x)
    assert np.abs(oracle - got).max() <= output_step(lowered)  # within one step of the output exponent
    assert reference.stats.overflows == 0
    assert max(reference.step_differences(x, exposed(lowered, x)).values()) <= 1  # every op within one step


def test_chunking_is_what_keeps_the_accumulators_from_overflowing(tmp_path: Path) -> None:
    """A Gemm whose weights all sit at full range: a whole-row int32 accumulation overflows on large inputs."""
    weight = np.full((4, 64), 0.5, np.float32)
    nodes = [helper.make_node("Gemm", ["input", "w"], ["output"], transB=1, name="fc")]
    model = float_model("fc", nodes, [numpy_helper.from_array(weight, "w")], (["N", 64], ["N", 4]))
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.full((8, 64), 1.0, np.float32))
    lowered = int16(model, calib).lowered
    x = {"input": np.full((2, 64), 1.0, np.float32)}
    chunked, whole = IntegerReference(lowered), IntegerReference(lowered, chunking=False)
    (right,), (wrapped,) = chunked.run(x), whole.run(x)
    assert chunked.stats.overflows == 0 and whole.stats.overflows == 8
    assert np.allclose(right, 32.0, rtol=1e-4) and not np.allclose(wrapped, 32.0, rtol=1e-2)
    # Mantissas of 0.5 are 2**14 (exponent -15): 3 * 2**14 * 2**15 fits int32, 4 of them would not.
    assert chunked.stats.reductions["fc"] == (64, 3)


def test_the_demo_model_keeps_fp32_accuracy_at_half_the_size() -> None:
    data = np.load(DEMO / "demo.npz")
    result = compressor.compress(DEMO / "demo.onnx", target="int16", calib=DEMO / "demo.npz", eval=DEMO / "demo.npz",
                                 measure_latency=False, progress=False)  # fmt: skip
    rows = {row.label: row for row in result.report.rows}
    assert rows["top-1 accuracy"].fp32 - rows["top-1 accuracy"].compressed <= 0.0005
    assert rows["SQNR vs fp32"].compressed >= 60.0
    assert rows["size"].compressed <= 0.55 * rows["size"].fp32
    x = {"input": data["x"][:32]}
    (got,) = run_onnx(result.lowered, x)
    reference = IntegerReference(result.lowered)
    assert np.abs(reference.run(x)[0] - got).max() <= output_step(result.lowered)
    assert reference.stats.overflows == 0


@pytest.mark.parametrize("name", ["resnet", "mobilenetv2", "squeezenet", "shufflenetv2", "vgg"])
def test_the_integer_reference_agrees_with_onnxruntime_on_the_zoo(name: str) -> None:
    try:
        model = zoo.get(name, build=False)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        pytest.skip(f"{name} is not cached: {exc}")
    lowered = int16(model.onnx_path, model.calib_path).lowered
    x = {ort.InferenceSession(model.onnx_path).get_inputs()[0].name: np.load(model.eval_path)["x"][:16]}
    (expected,) = run_onnx(model.onnx_path, x)
    (got,) = run_onnx(lowered, x)
    assert sqnr_db(expected, got) >= 60.0
    reference = IntegerReference(lowered)
    (oracle,) = reference.run(x)
    assert reference.stats.overflows == 0
    # Op by op every int16 tensor is within one step; end to end, float32 rounding in onnxruntime's emulation
    # flips a few roundings by one step, which later layers carry on (3 steps at most on these models).
    assert max(reference.step_differences(x, exposed(lowered, x)).values()) <= 1
    assert np.abs(oracle - got).max() <= 4 * output_step(lowered)
    assert (np.argmax(oracle, 1) == np.argmax(got, 1)).mean() >= 0.99


def test_a_model_with_nothing_to_quantize_is_left_as_is(tmp_path: Path) -> None:
    model = float_model("soft", [helper.make_node("Softmax", ["input"], ["output"], axis=1)], [], (["N", 4], ["N", 4]))
    calib = tmp_path / "c.npz"
    np.savez(calib, x=random_input((4, 4)))
    result = int16(model, calib)
    record = next(r for r in result.report.passes if r["name"] == "quantize_int16")
    assert record["modified"] is False
    assert not any(n.op_type == "QuantizeLinear" for n in result.lowered.graph.node)


def test_float_islands_run_on_onnxruntime_and_the_reference_refuses_them(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("MatMul", ["input", "w"], ["m"], name="fc"),
        helper.make_node("Softmax", ["m"], ["output"], axis=1, name="softmax"),
    ]
    weight = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    model = float_model("island", nodes, [weight], (["N", 4], ["N", 4]))
    calib = tmp_path / "c.npz"
    np.savez(calib, x=random_input((8, 4)))
    result = int16(model, calib)
    assert "softmax" in result.report.kept_float
    assert any("float island" in note for note in result.report.notes)
    x = {"input": random_input((3, 4), seed=5)}
    assert np.abs(run_onnx(result.lowered, x)[0] - run_onnx(model, x)[0]).max() <= 1e-3
    with pytest.raises(ModelError, match="'softmax' \\(Softmax\\) has no integer kernel"):
        IntegerReference(result.lowered)


def test_a_tensor_with_a_zero_range_is_a_clear_error(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Mul", ["input", "zero"], ["dead"], name="mul"),
        helper.make_node("Relu", ["dead"], ["output"], name="relu"),
    ]
    zero = numpy_helper.from_array(np.zeros((1, 4), np.float32), "zero")
    model = float_model("dead", nodes, [zero], (["N", 4], ["N", 4]))
    calib = tmp_path / "c.npz"
    np.savez(calib, x=random_input((8, 4)))
    with pytest.raises(ModelError, match=r"tensor 'dead'.*magnitude of 0"):
        int16(model, calib)


def test_cli_writes_an_int16_model(tmp_path: Path) -> None:
    from compressor.cli import main

    out = tmp_path / "demo.int16.onnx"
    code = main([str(DEMO / "demo.onnx"), "--target", "int16", "--calib", str(DEMO / "demo.npz"), "-o", str(out),
                 "--no-latency"])  # fmt: skip
    assert code == 0 and out.is_file()
    assert any(t.data_type == TensorProto.INT16 for t in onnx.load(out).graph.initializer)


def test_the_recipe_that_ran_replays_byte_for_byte(tiny_calib: Path, tmp_path: Path) -> None:
    first = int16(tiny_conv_net(), tiny_calib, int16={"per_channel": False})
    path = tmp_path / "recipe.toml"
    first.recipe.save(path)
    again = compressor.compress(tiny_conv_net(), recipe=path, calib=tiny_calib, progress=False)
    assert again.recipe.stages == first.recipe.stages
    assert again.lowered.SerializeToString() == first.lowered.SerializeToString()


def test_int8_with_the_int16_fallback_keeps_what_int8_breaks_integer(tiny_calib: Path) -> None:
    model = tiny_conv_net()
    settings = {"keep_float": ["conv2", "fc"], "min_sqnr_db": None}
    options = {"calib": tiny_calib, "latency_guard": False, "measure_latency": False, "measure_fidelity": False,
               "progress": False}  # fmt: skip
    floated = compressor.compress(model, target="int8", int8=settings, **options)
    integer = compressor.compress(model, target="int8", int8={**settings, "fallback": "int16"}, **options)
    assert {"conv2", "fc"} <= set(floated.report.kept_float)
    assert not {"conv2", "fc"} & set(integer.report.kept_float)
    record = next(r for r in integer.report.passes if r["name"] == "int16_fallback")
    assert {"conv2", "fc"} <= set(record["int16"])
    lowered = integer.lowered
    onnx.checker.check_model(lowered, full_check=True)
    ops = {n.op_type for n in lowered.graph.node}
    assert "QLinearConv" in ops  # the int8 part still runs as fused integer operators
    inits = {t.name: t for t in lowered.graph.initializer}
    producers = {o: n for n in lowered.graph.node for o in n.output}
    for node in (n for n in lowered.graph.node if n.op_type in ("Conv", "Gemm")):  # what is left in QDQ form
        weight = producers[node.input[1]]
        assert weight.op_type == "DequantizeLinear" and inits[weight.input[0]].data_type == TensorProto.INT16
    x = {"input": np.load(tiny_calib)["x"][:16]}
    (expected,) = run_onnx(model, x)
    (got,) = run_onnx(lowered, x)
    assert sqnr_db(expected, got) >= sqnr_db(expected, run_onnx(floated.lowered, x)[0]) - 1.0
    from compressor import ir as cir

    reference = IntegerReference(cir.to_proto(integer.model))  # int8 and int16 together, all in integers
    (oracle,) = reference.run(x)
    assert reference.stats.overflows == 0
    assert np.abs(oracle - got).max() <= 0.03 * np.abs(got).max()


def test_cli_fallback_needs_int8(tmp_path: Path) -> None:
    from compressor.cli import main

    code = main([str(DEMO / "demo.onnx"), "--target", "int16", "--fallback", "int16", "--calib", str(DEMO / "demo.npz"),
                 "-o", str(tmp_path / "o.onnx")])  # fmt: skip
    assert code == 2 and not (tmp_path / "o.onnx").exists()


def int8_pair(model: onnx.ModelProto | Path | str, calib: Path | str) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Our int8 model in QDQ form (what the reference runs) and its fused lowering (what onnxruntime runs)."""
    from compressor import ir as cir

    result = compressor.compress(model, target="int8", calib=calib, latency_guard=False, measure_latency=False,
                                 measure_fidelity=False, progress=False)  # fmt: skip
    return cir.to_proto(result.model), result.lowered


def exposed_int8(model: onnx.ModelProto, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """onnxruntime's value of every quantized tensor (QuantizeLinear outputs) of a QDQ ``model``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    inits = {t.name: t for t in model.graph.initializer}
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    probe.graph.output.extend(helper.make_tensor_value_info(n.output[0], inits[n.input[2]].data_type, None)
                              for n in quantize)  # fmt: skip
    values = run_onnx(probe, x)[len(model.graph.output) :]
    return dict(zip([n.output[0] for n in quantize], values, strict=True))


def assert_int8_reference_agrees(
    model: onnx.ModelProto | Path | str, calib: Path | str, x: dict, relative: float = 0.01
) -> None:
    qdq, fused = int8_pair(model, calib)
    reference = IntegerReference(qdq)
    (oracle,) = reference.run(x)
    (got,) = run_onnx(fused, x)
    assert reference.stats.overflows == 0
    # Op by op, every int8 tensor within one step of onnxruntime's; end to end the logits stay close.
    assert max(reference.step_differences(x, exposed_int8(qdq, x)).values()) <= 1
    assert np.abs(oracle - got).max() <= relative * np.abs(got).max()
    assert (np.argmax(oracle, 1) == np.argmax(got, 1)).mean() >= 0.99


def test_the_integer_reference_runs_int8_like_the_fused_lowering(tiny_calib: Path) -> None:
    # Random weights carry one-step differences further than trained ones: 1.3% of the largest logit here.
    x = {"input": np.load(tiny_calib)["x"][:16]}
    assert_int8_reference_agrees(tiny_conv_net(), tiny_calib, x, relative=0.03)


@pytest.mark.parametrize("name", ["demo", "resnet", "mobilenetv2", "squeezenet", "shufflenetv2", "vgg"])
def test_the_integer_reference_runs_int8_on_the_zoo(name: str) -> None:
    if name == "demo":
        paths = (DEMO / "demo.onnx", DEMO / "demo.npz", DEMO / "demo.npz")
    else:
        try:
            model = zoo.get(name, build=False)
        except (FileNotFoundError, ValueError, KeyError) as exc:
            pytest.skip(f"{name} is not cached: {exc}")
        paths = (model.onnx_path, model.calib_path, model.eval_path)
    x = {ort.InferenceSession(str(paths[0])).get_inputs()[0].name: np.load(paths[2])["x"][:32]}
    assert_int8_reference_agrees(paths[0], paths[1], x)


@settings(max_examples=200, deadline=None)
@given(st.integers(-(2**31), 2**31), st.floats(1e-6, 1e3), st.floats(1e-6, 1e3))
def test_int8_requantization_is_within_a_tie_of_exact(mantissa: int, scale: float, target: float) -> None:
    from compressor.backends import integer_kernels as k

    if scale / target >= 2**14:  # int8 requantization ratios are below 1; large ones are refused
        return
    source_multiplier, source_exponent = _parts(scale)
    value = k.Fixed.of(np.array([mantissa]), source_exponent, 1, source_multiplier)
    multiplier, exponent = _parts(target)
    got, _ = k.requantize(value, np.asarray(exponent), np.int64, np.asarray(multiplier))
    exact = Fraction(mantissa) * Fraction(float(np.float32(scale))) / Fraction(float(np.float32(target)))
    assert abs(int(got[0]) - exact) <= Fraction(1, 2) + abs(exact) * Fraction(1, 2**28)


def _parts(scale: float) -> tuple[int, int]:
    from compressor.backends.integer_reference import _scale_parts

    multiplier, exponent = _scale_parts(np.float32(scale))
    return int(multiplier), int(exponent)
