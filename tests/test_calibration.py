"""Calibration observers: streaming state, clipping methods, and the reductions added inside the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import DEMO_ONNX
from onnx import TensorProto, helper
from test_quantize_int8 import imported

from compressor import ir as cir
from compressor import runtime
from compressor.data import Dataset
from compressor.quantization import calibration


class TestObservers:
    def test_minmax_and_moving_average(self) -> None:
        minmax, moving = calibration.MinMaxObserver(), calibration.MovingAverageObserver(momentum=0.5)
        for batch in (np.array([1.0, 2.0]), np.array([-3.0, 0.5])):
            minmax.update(batch)
            moving.update(batch)
        assert minmax.range() == (-3.0, 2.0)
        assert moving.range() == pytest.approx((-1.0, 1.25))  # 0.5 * first + 0.5 * second

    def test_histogram_rebinning_keeps_counts_and_percentiles(self) -> None:
        values = np.random.default_rng(0).uniform(0, 10, 200_000).astype(np.float32)
        observer = calibration.HistogramObserver("percentile", percentile=99.0)
        for chunk in np.array_split(np.sort(values), 50):  # a growing range forces re-binning
            observer.update(chunk)
        assert observer.counts.sum() == pytest.approx(values.size)
        assert observer.range()[1] == pytest.approx(np.percentile(values, 99.0), rel=0.01)

    @pytest.mark.parametrize("method", calibration.METHODS)
    def test_state_does_not_grow_with_samples(self, method: str) -> None:
        rng = np.random.default_rng(0)
        observer = calibration.make_observer(method)
        observer.update(rng.standard_normal(32 * 64).astype(np.float32))
        after_32 = observer.state_bytes()
        for _ in range(15):  # 512 samples' worth
            observer.update(rng.standard_normal(32 * 64).astype(np.float32))
        assert observer.state_bytes() == after_32
        low, high = observer.range()
        assert low <= 0 <= high and high > 0

    def test_collect_reduces_inside_the_model_exactly(self) -> None:
        """Min/max and channel means computed by onnxruntime equal numpy's on the exposed tensors."""
        model = imported(DEMO_ONNX)
        dataset = Dataset(DEMO_ONNX.with_suffix(".npz"), runtime.input_specs(model))
        conv_inputs = list(dict.fromkeys(n.inputs[0].name for n in model.graph if n.op_type == "Conv"))
        observers = {name: calibration.ChannelMeanObserver(1, calibration.MinMaxObserver()) for name in conv_inputs}
        kept = calibration.collect(model, dataset, observers, num_samples=40, batch_size=16, keep_outputs=24)
        probe = cir.to_proto(model)
        graph_inputs = {i.name for i in probe.graph.input}
        probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in conv_inputs if name not in graph_inputs)
        session = runtime.make_session(probe)
        names = [o.name for o in session.get_outputs()]
        feeds = dataset.first_batch(40)
        values = dict(zip(names, runtime.run(session, feeds), strict=True)) | feeds
        for name in conv_inputs:
            tensor = values[name]
            assert observers[name].range() == pytest.approx((min(0.0, tensor.min()), max(0.0, tensor.max())))
            np.testing.assert_allclose(observers[name].mean(), tensor.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(kept[0], values[names[0]][:24], rtol=1e-6)

    @pytest.mark.parametrize(
        ("elem_type", "dtype", "pooled"),
        [
            (TensorProto.FLOAT, np.float32, True),
            (TensorProto.FLOAT16, np.float16, True),
            (TensorProto.DOUBLE, np.float64, False),
        ],
    )
    def test_non_negative_outputs_skip_the_minimum_and_ranges_stay_exact(
        self, tmp_path: Path, elem_type: int, dtype: type, pooled: bool
    ) -> None:
        """Relu and Clip(0, 6) outputs get no ReduceMin, Clip(-1, 1) does; feature maps are max-pooled first
        where onnxruntime's CPU has the pool (not for double).

        Every range still equals numpy's.
        """
        bounds = [helper.make_tensor(n, elem_type, [], [v]) for n, v in (("0", 0), ("6", 6), ("-1", -1), ("1", 1))]
        nodes = [
            helper.make_node("Relu", ["input"], ["relu"]),
            helper.make_node("Clip", ["input", "0", "6"], ["relu6"]),
            helper.make_node("Clip", ["input", "-1", "1"], ["signed"]),
        ]
        feature_map = [None, 3, 5, 5]
        inputs = [helper.make_tensor_value_info("input", elem_type, feature_map)]
        outputs = [helper.make_tensor_value_info(n, elem_type, feature_map) for n in ("relu", "relu6", "signed")]
        graph = helper.make_graph(nodes, "g", inputs, outputs, bounds)
        source = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model = ir.serde.deserialize_model(source)
        x = (np.random.default_rng(0).standard_normal((12, 3, 5, 5)) * 3 + 2).astype(dtype)
        np.savez(tmp_path / "x.npz", x=x)
        observers = {name: calibration.MinMaxObserver() for name in ("relu", "relu6", "signed")}
        instrumented, _ = calibration._instrumented(model, observers)
        reduced = {node.input[0] for node in instrumented.graph.node if node.op_type == "ReduceMin"}
        assert reduced == {"signed"}
        pools = sorted(node.input[0] for node in instrumented.graph.node if node.op_type == "GlobalMaxPool")
        assert pools == (sorted(observers) if pooled else [])
        calibration.collect(model, Dataset(tmp_path / "x.npz", runtime.input_specs(model)), observers, batch_size=5)
        expected = {"relu": np.maximum(x, 0), "relu6": np.clip(x, 0, 6), "signed": np.clip(x, -1, 1)}
        for name, values in expected.items():
            assert observers[name].range() == pytest.approx((min(0.0, values.min()), max(0.0, values.max())))

    def test_clipping_methods_clip_outliers(self) -> None:
        values = np.concatenate([np.random.default_rng(0).standard_normal(100_000), [80.0]]).astype(np.float32)
        for method in ("percentile", "entropy"):
            observer = calibration.make_observer(method)
            observer.update(values)
            assert observer.range()[1] < 20.0, method

    def test_mse_clips_a_heavy_tail(self) -> None:
        # One far outlier costs more squared error clipped than kept, but a long tail does not.
        values = np.random.default_rng(0).laplace(size=100_000).astype(np.float32)
        mse, minmax = calibration.make_observer("mse"), calibration.make_observer("minmax")
        mse.update(values)
        minmax.update(values)
        assert mse.range()[1] < 0.9 * minmax.range()[1]
