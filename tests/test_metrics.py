"""Metrics: MAC counts by hand, SQNR and agreement on known arrays, the report's JSON."""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import conv_bn_model
from onnx import TensorProto, helper, numpy_helper

from compressor import runtime
from compressor.metrics import (
    compare_outputs,
    compute_cost,
    one_at_a_time_latency,
    sqnr_db,
    top1_accuracy,
    top1_agreement,
)
from compressor.pipeline import Tolerance
from compressor.report import Report, Row


def test_macs_and_params_of_the_hand_built_model() -> None:
    cost = compute_cost(conv_bn_model(identity=False))
    conv1 = 8 * 8 * 8 * (3 * 3 * 3)  # out elements x (C_in x k x k)
    conv2 = 8 * 8 * 8 * (8 * 3 * 3)
    fc = 5 * 8
    assert cost.macs == conv1 + conv2 + fc
    assert cost.params == (8 * 27 + 8) + 8 * 72 + (5 * 8 + 5) + 2 * 4 * 8


def test_sqnr_and_agreement() -> None:
    ref = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert sqnr_db(ref, ref) == math.inf
    assert sqnr_db(ref, ref * 1.1) == pytest.approx(20.0)  # noise is 10% of the signal amplitude
    assert top1_agreement(ref, np.array([[1.0, 0.0], [3.0, 2.0]])) == 0.5
    assert top1_accuracy(ref, np.array([0, 0])) == 0.5


def test_comparison_against_tolerances() -> None:
    ref = [np.array([[1.0, 2.0, 3.0]], np.float32)]
    close = [ref[0] + np.float32(1e-6)]
    far = [ref[0] + np.float32(0.1)]
    assert compare_outputs(ref, close).violation(Tolerance()) is None
    assert "max relative error" in compare_outputs(ref, far).violation(Tolerance())
    assert compare_outputs(ref, far).violation(Tolerance(max_relative_error=None, min_sqnr_db=20)) is None
    with pytest.raises(ValueError, match="shape changed"):
        compare_outputs(ref, [np.zeros((2, 3), np.float32)])


def test_report_table_and_json(tmp_path: Path) -> None:
    report = Report(model="m.onnx", target="fp32", backend="cpu")
    report.rows += [
        Row("size", 4_000_000, 1_000_000, "bytes"),
        Row("top-1 accuracy", 0.91, 0.905, "fraction"),
        Row("SQNR vs fp32", math.inf, 35.2, "db"),
    ]
    table = report.table()
    assert "| size | 4.000 MB | 1.000 MB | 4.00× |" in table
    assert "| top-1 accuracy | 91.00% | 90.50% | -0.50 pt |" in table
    assert "| SQNR vs fp32 | exact | 35.2 dB | — |" in table
    report.write_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["summary"]["size"]["ratio"] == 4.0
    assert data["summary"]["SQNR vs fp32"]["fp32"] == "inf"


def test_one_at_a_time_latency_never_overlaps_sessions_and_orders_models() -> None:
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((1024, 1024)).astype(np.float32), "w")
    big = helper.make_model(
        helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])],
            "big",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [256, 1024])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [weight],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=8,
    )
    alive: weakref.WeakSet[ort.InferenceSession] = weakref.WeakSet()
    most_alive = []

    def factory(model: onnx.ModelProto) -> Callable[[], ort.InferenceSession]:
        def build() -> ort.InferenceSession:
            session = runtime.make_session(model, options=runtime.session_options(1, spinning=True))
            alive.add(session)
            most_alive.append(len(alive))
            return session

        return build

    feeds = {
        "input": rng.standard_normal((1, 3, 8, 8)).astype(np.float32),
        "x": rng.standard_normal((256, 1024)).astype(np.float32),
    }
    small, large = one_at_a_time_latency([factory(conv_bn_model()), factory(big)], feeds, runs=6, rounds=3)
    assert small.runs == large.runs == 6
    assert 0 < small.median_ms < large.median_ms  # 0.5 GFLOP against a few kFLOP
    assert most_alive == [1] * 6, "each round builds each session once, and only one is alive at a time"
