"""The latency guard: int8 islands, variants with islands in float, and the measured choice."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import float_model, random_input, run_onnx
from onnx import TensorProto, helper, numpy_helper

from compressor import runtime
from compressor.api import compress
from compressor.backends.latency_guard import LatencyGuard, int8_islands
from compressor.backends.onnxruntime_cpu import OnnxruntimeCPU
from compressor.data import Dataset
from compressor.metrics import Latency, sqnr_db
from compressor.passes.quantize_int8 import QuantizeInt8, QuantizeInt8Config
from compressor.pipeline import PassContext, Pipeline
from compressor.stages.quantize_int8 import keep_faster_islands

CONFIG = QuantizeInt8Config(min_sqnr_db=None, bias_correction=False, weight_bits=7)


def two_island_model() -> onnx.ModelProto:
    """conv0 -> relu -> conv1 -> Sigmoid (never quantized) -> conv2 -> relu -> maxpool -> conv3."""
    rng = np.random.default_rng(0)
    nodes, inits, value = [], [], "input"
    for i in range(4):
        inits += [
            numpy_helper.from_array(rng.uniform(-0.5, 0.5, (8, 8 if i else 3, 3, 3)).astype(np.float32), f"w{i}"),
            numpy_helper.from_array(rng.uniform(-0.1, 0.1, 8).astype(np.float32), f"b{i}"),
        ]
        nodes.append(helper.make_node("Conv", [value, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1] * 4))
        value = f"c{i}"
        after = {0: "Relu", 1: "Sigmoid", 2: "Relu"}.get(i)
        if after:
            nodes.append(helper.make_node(after, [value], [f"a{i}"], name=f"{after.lower()}{i}"))
            value = f"a{i}"
        if i == 2:
            pool = helper.make_node("MaxPool", [value], ["p2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2])
            nodes.append(pool)
            value = "p2"
    graph = helper.make_graph(
        nodes, "two_islands",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info(value, TensorProto.FLOAT, ["N", 8, 8, 8])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def calib(tmp_path: Path) -> Path:
    path = tmp_path / "calib.npz"
    np.savez(path, x=random_input((32, 3, 16, 16), seed=1))
    return path


def quantized(proto: onnx.ModelProto, calib: Path) -> tuple[ir.Model, QuantizeInt8]:
    model = ir.serde.deserialize_model(proto)
    quantize = QuantizeInt8(CONFIG)
    Pipeline([quantize]).run(model, PassContext(calibration=Dataset(calib, runtime.input_specs(model))))
    return model, quantize


def test_islands_split_where_a_float_op_sits(calib: Path) -> None:
    model, _ = quantized(two_island_model(), calib)
    assert int8_islands(model) == [frozenset({"conv2", "pool2", "conv3"}), frozenset({"conv0", "conv1"})]


def branch_model() -> onnx.ModelProto:
    """conv0 -> relu -> Split -> (conv_a, conv_b) -> Concat -> conv_c: a block with two branches."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.uniform(-0.5, 0.5, (8, 3, 3, 3)).astype(np.float32), "w0")]
    inits += [numpy_helper.from_array(rng.uniform(-0.5, 0.5, (4, 4, 3, 3)).astype(np.float32), f"w_{b}") for b in "ab"]
    inits += [numpy_helper.from_array(rng.uniform(-0.5, 0.5, (8, 8, 1, 1)).astype(np.float32), "w_c")]
    nodes = [
        helper.make_node("Conv", ["input", "w0"], ["c0"], name="conv0", pads=[1] * 4),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Split", ["r0"], ["s_a", "s_b"], name="split", axis=1, num_outputs=2),
        *[helper.make_node("Conv", [f"s_{b}", f"w_{b}"], [f"c_{b}"], name=f"conv_{b}", pads=[1] * 4) for b in "ab"],
        helper.make_node("Concat", ["c_a", "c_b"], ["cat"], name="concat", axis=1),
        helper.make_node("Conv", ["cat", "w_c"], ["output"], name="conv_c"),
    ]
    return float_model("branches", nodes, inits, (["N", 3, 16, 16], ["N", 8, 16, 16]), opset=18)


def test_each_branch_of_a_split_starts_an_island(calib: Path) -> None:
    proto = branch_model()
    model, quantize = quantized(proto, calib)
    islands = int8_islands(model)
    assert islands == [frozenset({"conv_a", "conv_b", "concat", "conv_c"}), frozenset({"conv0", "split"})]
    x = random_input((8, 3, 16, 16), seed=2)
    reference = run_onnx(proto, {"input": x})[0]
    for island in islands:  # either side in float still quantizes the other from calibrated ranges
        lowered = OnnxruntimeCPU().lower(quantize.variant(island))
        assert sqnr_db(reference, run_onnx(lowered, {"input": x})[0]) > 25.0


def test_variant_puts_exactly_the_island_back_in_float(calib: Path) -> None:
    proto = two_island_model()
    model, quantize = quantized(proto, calib)
    same = quantize.variant(frozenset())
    assert [n.op_type for n in same.graph] == [n.op_type for n in model.graph]
    backend = OnnxruntimeCPU()
    island = frozenset({"conv2", "pool2", "conv3"})
    lowered = backend.lower(quantize.variant(island))
    fused = {n.name for n in lowered.graph.node if n.op_type.startswith("QLinear")}
    assert fused == {"conv0", "conv1"}  # the float Sigmoid reads conv1's integer output dequantized
    assert {n.name for n in lowered.graph.node if n.op_type == "Conv"} == {"conv2", "conv3"}
    x = random_input((8, 3, 16, 16), seed=2)
    reference = run_onnx(proto, {"input": x})[0]
    all_int8 = run_onnx(backend.lower(model), {"input": x})[0]
    half = run_onnx(lowered, {"input": x})[0]
    assert sqnr_db(reference, all_int8) > 25.0
    assert sqnr_db(reference, half) > sqnr_db(reference, all_int8)


class CountingCPU(OnnxruntimeCPU):
    """The real CPU lowering, timed by a fixed cost per operator instead of the clock.

    The guard's decisions are what is under test here; a wall clock would make
    them depend on the machine. Each QLinearConv "costs" ``int8_conv`` and each
    float Conv 1.0, so the test decides which side is faster.
    """

    def __init__(self, int8_conv: float, dequantize: float = 0.01) -> None:
        super().__init__()
        self.int8_conv = int8_conv
        self.dequantize = dequantize
        self.costs: dict[int, float] = {}  # id(session) -> its model's cost

    def session(self, model: ir.Model | onnx.ModelProto, *, spinning: bool = True) -> ort.InferenceSession:
        proto = self.lower(model) if isinstance(model, ir.Model) else model
        session = super().session(proto, spinning=spinning)  # each candidate must still build a real session
        costs = {"QLinearConv": self.int8_conv, "Conv": 1.0, "DequantizeLinear": self.dequantize}
        self.costs[id(session)] = sum(costs.get(node.op_type, 0.01) for node in proto.graph.node)
        return session

    def time_sessions(
        self,
        sessions: Sequence[ort.InferenceSession],
        feeds: Mapping[str, np.ndarray],
        runs: int | None = None,
        seconds: float = 1.0,
        max_runs: int = 500,
        warmup: int = 3,
    ) -> list[Latency]:
        return [Latency(cost, cost, cost, runs or 1) for cost in (self.costs[id(s)] for s in sessions)]


def guard_choice(calib: Path, int8_conv: float, budget: float = 8.0) -> tuple[frozenset[str], LatencyGuard]:
    model, quantize = quantized(two_island_model(), calib)
    backend = CountingCPU(int8_conv)
    guard = LatencyGuard(backend, {"input": random_input((1, 3, 16, 16))}, budget=budget)
    islands = int8_islands(model)
    reference = backend.lower(quantize.variant(frozenset().union(*islands)))
    chosen = guard(reference, backend.lower(model), lambda extra: backend.lower(quantize.variant(extra)), islands)
    return chosen, guard


def test_guard_keeps_int8_where_it_is_faster(calib: Path) -> None:
    chosen, guard = guard_choice(calib, int8_conv=0.3)
    assert chosen == frozenset() and len(guard.history) == 1 and guard.speedup > 1.4 and guard.gain == 1.0


def test_guard_puts_every_slower_island_in_float(calib: Path) -> None:
    chosen, guard = guard_choice(calib, int8_conv=1.5)
    assert chosen == frozenset({"conv0", "conv1", "conv2", "pool2", "conv3"})
    assert [len(kept) for kept, _ in guard.history] == [0, 3, 5]
    assert guard.speedup == pytest.approx(1.0, abs=0.05)
    assert guard.gain > 1.2 and guard.gain == pytest.approx(guard.speedup / guard.history[0][1])  # a fixed fp32 cost


def test_guard_tries_all_islands_in_float_when_each_alone_gains_too_little(calib: Path) -> None:
    # Either island alone saves about 2% (less than MARGIN), both together 4.5%: int8 was 0.96x fp32.
    chosen, guard = guard_choice(calib, int8_conv=1.04)
    assert [len(kept) for kept, _ in guard.history] == [0, 3, 2, 5]
    assert chosen == frozenset({"conv0", "conv1", "conv2", "pool2", "conv3"})
    assert guard.speedup == pytest.approx(1.0, abs=0.01)


def test_guard_past_its_budget_goes_to_all_islands_in_float(calib: Path) -> None:
    """On graphs of hundreds of islands the one-by-one search stops: its cost must not grow with the layers."""
    chosen, guard = guard_choice(calib, int8_conv=1.5, budget=0.0)
    assert [len(kept) for kept, _ in guard.history] == [0, 5], "no island alone, then all of them at once"
    assert guard.untried == 2
    assert chosen == frozenset({"conv0", "conv1", "conv2", "pool2", "conv3"})


def test_compress_reports_the_guard(calib: Path) -> None:
    result = compress(two_island_model(), "int8", calib=calib, measure_latency=False)
    history = result.report.passes[-1]["latency_guard"]
    assert history[0]["kept_float"] == [] and history[0]["speedup"] > 0
    floated = {name for kept in (h["kept_float"] for h in history) for name in kept}
    reasons = {name: why for name, why in result.report.kept_float.items() if "slower than float" in why}
    assert set(reasons) <= floated
    off = compress(two_island_model(), "int8", calib=calib, measure_latency=False, latency_guard=False)
    assert "latency_guard" not in off.report.passes[-1]


def test_islands_put_in_float_keep_int8_weights(calib: Path) -> None:
    model, quantize = quantized(two_island_model(), calib)
    backend = CountingCPU(int8_conv=1.5)
    guard = LatencyGuard(backend, {"input": random_input((1, 3, 16, 16))})
    variant, _, _ = keep_faster_islands(guard, quantize, backend, model)
    convs = {"conv0", "conv1", "conv2", "conv3"}
    assert {n for n, why in quantize.skipped.items() if "weights stay int8" in why} == convs
    lowered = backend.lower(variant)
    producers = {output: node for node in lowered.graph.node for output in node.output}
    stored = {t.name: t.data_type for t in lowered.graph.initializer}
    for conv in (n for n in lowered.graph.node if n.name in convs):
        assert conv.op_type == "Conv"
        mul = producers[conv.input[1]]
        assert stored[producers[mul.input[0]].input[0]] == TensorProto.INT8, "int8 in the file, float at load"
        assert stored[conv.input[2]] == TensorProto.FLOAT, "biases stay float"
    x = random_input((8, 3, 16, 16), seed=5)
    expected = run_onnx(two_island_model(), {"input": x})[0]
    actual = runtime.run(runtime.make_session(lowered), {"input": x})[0]
    assert sqnr_db(expected, actual) > 35.0  # weight rounding only


def test_islands_keep_float_weights_where_the_backend_would_dequantize_every_call(calib: Path) -> None:
    model, quantize = quantized(two_island_model(), calib)
    backend = CountingCPU(int8_conv=1.5, dequantize=1.0)
    backend.qdq = True  # the QDQ form, as on CUDA: a weight DequantizeLinear would run on every call
    assert not backend.dequantizes_weights_at_load
    guard = LatencyGuard(backend, {"input": random_input((1, 3, 16, 16))})
    variant, _, _ = keep_faster_islands(guard, quantize, backend, model)
    assert not [n for n in variant.graph if n.op_type == "DequantizeLinear"]
    assert not [why for why in quantize.skipped.values() if "weights stay int8" in why]
