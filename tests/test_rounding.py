"""Rounding optimisation: AdaRound on a hand-built layer against every rounding, the patch rows against
onnxruntime's Conv, and the int8 pass with ``rounding="adaround"`` against rounding to nearest."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from compressor import compress, runtime
from compressor.errors import UsageError
from compressor.metrics import compare_outputs
from compressor.quantization import adaround
from compressor.quantization.int8_config import QuantizeInt8Config
from compressor.quantization.rounding import MAX_POSITIONS, _Layer
from tests.conftest import DEMO_ONNX

DEMO_NPZ = DEMO_ONNX.with_suffix(".npz")


def layer_problem(seed: int, levels: int, fan_in: int = 10, outputs: int = 3, rows: int = 400):
    """A dense layer on correlated inputs whose quantized copy carries noise: problem, moments, objective."""
    rng = np.random.default_rng(seed)
    mix = np.eye(fan_in) + 0.5 * rng.normal(size=(fan_in, fan_in))
    x = rng.normal(size=(rows, fan_in)) @ mix + rng.normal(size=fan_in)
    x_quantized = x + rng.normal(scale=0.05, size=x.shape)
    weight = rng.normal(size=(1, outputs, fan_in)).astype(np.float32)
    scale = (np.abs(weight).max(-1) / levels).astype(np.float32)
    problem = adaround.LayerProblem(weight, scale, np.zeros_like(scale), -levels, levels)
    moments = adaround.LayerMoments(1, fan_in)
    moments.update(x_quantized[None].astype(np.float32), x[None].astype(np.float32))
    return problem, moments, adaround._Objective(weight, moments, centered=True)


def loss_of(problem: adaround.LayerProblem, objective, integers: np.ndarray) -> float:
    return objective.exact(problem.scale[..., None] * integers - problem.weight)


def brute_force(problem: adaround.LayerProblem, objective) -> float:
    """The least objective over every floor/ceiling choice: channels are independent terms, so per channel."""
    floor = np.floor(problem.weight / problem.scale[..., None])
    best = -(problem.weight.shape[1] - 1) * objective.constant  # each channel's search counts the constant once
    for channel in range(problem.weight.shape[1]):
        losses = []
        for ups in itertools.product((0.0, 1.0), repeat=problem.weight.shape[2]):
            integers = problem.weight / problem.scale[..., None]  # other channels: exactly their float weights
            integers = integers.copy()
            integers[0, channel] = np.clip(floor[0, channel] + np.array(ups), problem.qmin, problem.qmax)
            losses.append(loss_of(problem, objective, integers))
        best += min(losses)
    return best


class TestLayer:
    @pytest.mark.parametrize("seed", range(4))
    def test_within_two_percent_of_the_best_rounding_on_a_7_bit_grid(self, seed: int) -> None:
        problem, moments, objective = layer_problem(seed, levels=63)
        result = adaround.round_layer(problem, moments, adaround.RoundingSettings())
        best, nearest = brute_force(problem, objective), loss_of(problem, objective, problem.nearest())
        ours = loss_of(problem, objective, result.q)
        assert result.outcome == "adaround"
        assert ours <= 1.02 * best, (ours, best)
        assert ours < nearest
        assert result.sqnr_db > result.sqnr_nearest_db

    def test_closes_most_of_the_gap_on_a_coarse_grid(self) -> None:
        gaps = []
        for seed in range(4):
            problem, moments, objective = layer_problem(seed, levels=7)
            result = adaround.round_layer(problem, moments, adaround.RoundingSettings())
            best, nearest = brute_force(problem, objective), loss_of(problem, objective, problem.nearest())
            gaps.append((loss_of(problem, objective, result.q) - best) / (nearest - best))
        assert max(gaps) <= 1.0 and np.mean(gaps) <= 0.5, gaps

    def test_bias_refit_matches_the_float_mean(self) -> None:
        problem, moments, _ = layer_problem(0, levels=63)
        result = adaround.round_layer(problem, moments, adaround.RoundingSettings())
        q_mean, f_mean = moments.means()
        rounded = result.scale[..., None] * result.q
        after = np.sum(rounded * q_mean[:, None, :], -1).reshape(-1) - result.bias_shift
        assert np.allclose(after, np.sum(problem.weight * f_mean[:, None, :], -1).reshape(-1), atol=1e-5)

    def test_scale_refit_never_raises_the_error(self) -> None:
        problem, moments, _ = layer_problem(1, levels=63)
        plain = adaround.round_layer(problem, moments, adaround.RoundingSettings())
        refit = adaround.round_layer(problem, moments, adaround.RoundingSettings(refit_scale=True))
        assert refit.sqnr_db >= plain.sqnr_db - 1e-6
        assert np.array_equal(refit.scale, refit.scale.astype(np.float16).astype(np.float32))

    def test_non_finite_data_falls_back_to_nearest(self) -> None:
        problem, moments, _ = layer_problem(0, levels=63)
        moments.qq[0, 0, 0] = np.nan
        result = adaround.round_layer(problem, moments, adaround.RoundingSettings(iterations=20))
        assert result.outcome.startswith("nearest: the optimisation diverged")
        assert np.array_equal(result.q, problem.nearest())


def conv_model(weight: np.ndarray, group: int, strides, pads, dilations) -> onnx.ModelProto:
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=group, strides=strides, pads=pads, dilations=dilations)
    graph = helper.make_graph(
        [node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [onnx.numpy_helper.from_array(weight, "w")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize(
    ("channels", "group", "kernel", "strides", "pads", "dilations", "size"),
    [
        (8, 8, 3, (2, 2), (0, 0, 1, 1), (1, 1), 15),  # depthwise, asymmetric pads
        (6, 1, 1, (2, 2), (0, 0, 0, 0), (1, 1), 12),  # strided pointwise
        (8, 2, 3, (1, 2), (1, 2, 2, 1), (2, 1), 13),  # grouped, dilated, uneven
    ],
)
def test_rows_times_weight_is_onnxruntime_conv(channels, group, kernel, strides, pads, dilations, size) -> None:
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(channels, channels // group, kernel, kernel)).astype(np.float32)
    x = rng.normal(size=(2, channels, size, size)).astype(np.float32)
    expected = runtime.run(runtime.make_session(conv_model(weight, group, strides, pads, dilations)), {"x": x})[0]
    assert expected.shape[2] * expected.shape[3] <= MAX_POSITIONS  # every position is read
    layer = _Layer("conv", "Conv", "w", weight, group, (channels // group) * kernel * kernel, False,
                   (kernel, kernel), strides, pads, dilations)  # fmt: skip
    rows, _ = layer.rows((x, x), np.random.default_rng(0))
    out = np.einsum("gpk,gok->gpo", rows, layer.grouped(weight))  # [G, N * positions, O]
    assert np.array_equal(layer.ungrouped(layer.grouped(weight)), weight)
    grouped = expected.reshape(2, group, channels // group, -1).transpose(1, 0, 3, 2).reshape(out.shape)
    np.testing.assert_allclose(out, grouped, rtol=1e-5, atol=1e-5)


def demo_sqnr(result, x: np.ndarray) -> float:
    reference = runtime.run(runtime.make_session(onnx.load(DEMO_ONNX)), {"input": x})
    return float(compare_outputs(reference, runtime.run(runtime.make_session(result.lowered), {"input": x})).sqnr_db)


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("rounding")
    data = np.load(DEMO_NPZ)
    np.savez(folder / "calib.npz", x=data["x"][:256])
    held_out = data["x"][256:]
    common = {"calib": folder / "calib.npz", "measure_latency": False, "latency_guard": False}
    nearest = compress(DEMO_ONNX, "int8", int8={"min_sqnr_db": None}, **common)
    rounded = compress(DEMO_ONNX, "int8", int8={"min_sqnr_db": None, "rounding": "adaround"}, **common)
    return nearest, rounded, held_out, folder


class TestPass:
    def test_rounding_beats_nearest_on_held_out_data(self, demo_runs) -> None:
        nearest, rounded, held_out, _ = demo_runs
        assert demo_sqnr(rounded, held_out) >= demo_sqnr(nearest, held_out) + 0.5
        onnx.checker.check_model(rounded.lowered, full_check=True)

    def test_report_has_every_layer_before_and_after(self, demo_runs) -> None:
        _, rounded, _, _ = demo_runs
        record = next(p for p in rounded.report.passes if p["name"] == "quantize_int8")
        layers = {layer["node"]: layer for layer in record["rounding"]}
        convs = [n.name for n in ir.load(DEMO_ONNX).graph if n.op_type in ("Conv", "Gemm")]
        assert set(layers) == set(convs)
        rounded_layers = [layer for layer in layers.values() if layer["outcome"] == "adaround"]
        assert len(rounded_layers) >= len(convs) - 1
        assert all(layer["sqnr_db"] > layer["sqnr_nearest_db"] for layer in rounded_layers)

    def test_recipe_replays_the_same_model(self, demo_runs) -> None:
        _, rounded, _, folder = demo_runs
        again = compress(DEMO_ONNX, recipe=rounded.recipe, calib=folder / "calib.npz")
        assert again.lowered.SerializeToString() == rounded.lowered.SerializeToString()
        assert rounded.recipe.to_dict()["stages"][0]["rounding"] == "adaround"

    def test_too_few_samples_keep_nearest_and_say_so(self, tmp_path: Path) -> None:
        np.savez(tmp_path / "few.npz", x=np.load(DEMO_NPZ)["x"][:4])
        result = compress(DEMO_ONNX, "int8", calib=tmp_path / "few.npz", int8={"rounding": "adaround"},
                          measure_latency=False, latency_guard=False)  # fmt: skip
        record = next(p for p in result.report.passes if p["name"] == "quantize_int8")
        gemm = next(layer for layer in record["rounding"] if layer["op"] == "Gemm")
        assert gemm["outcome"].startswith("nearest: too few calibration rows (4)")
        short = [layer["node"] for layer in record["rounding"] if layer["outcome"].startswith("nearest: too few")]
        expected = f"rounding: {len(short)} layer(s) kept rounding to nearest, with fewer calibration rows than inputs"
        assert any(note.startswith(expected) for note in result.report.notes), result.report.notes


def test_config_domain() -> None:
    with pytest.raises(UsageError, match="rounding"):
        QuantizeInt8Config(rounding="stochastic")
    with pytest.raises(UsageError, match="rounding_iterations"):
        QuantizeInt8Config(rounding_iterations=-1)
