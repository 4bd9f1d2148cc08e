"""LRP relevance scores for pruning (`compressor.pruning.lrp`): conservation, dead and strong channels, the demo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from compressor.errors import ModelError
from compressor.metrics import compute_cost, layer_shapes
from compressor.passes import import_passes
from compressor.pipeline import PassContext, Pipeline
from compressor.pruning.channels import ChannelGraph, analyze
from compressor.pruning.lrp import LrpUnsupportedError, lrp_relevance, lrp_scores
from compressor.pruning.selection import MacsModel, choose, l1_scores
from compressor.pruning.surgery import remove_channels
from compressor.runtime import make_session

DEMO = Path(__file__).resolve().parents[1] / "compressor" / "demo"


def _small(
    residual: bool = False, pool: str = "GlobalAveragePool", dead: int | None = None, strong: int | None = None
) -> ir.Model:
    """Conv(3->8)-Relu-Conv(8->8)[-Add]-Relu-pool-Flatten-Gemm(8->4), no biases; ``dead``/``strong``: conv2 channels."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32)
    fc = rng.normal(0, 0.3, (4, 8)).astype(np.float32)
    if dead is not None:
        w2[dead] = 0.0
    if strong is not None:
        w2[strong] = np.abs(w2[strong])
        fc[:, strong] = 3.0
    second = "c2" if residual else "a2"
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], [second], name="conv2", pads=[1, 1, 1, 1]),
    ]
    if residual:
        nodes.append(helper.make_node("Add", ["r1", "c2"], ["a2"], name="add"))
    nodes.append(helper.make_node("Relu", ["a2"], ["r2"], name="relu2"))
    if pool == "GlobalAveragePool":
        nodes.append(helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"))
    else:
        nodes.append(helper.make_node(pool, ["r2"], ["p"], name="pool", axes=[2, 3], keepdims=1))
    nodes += [
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (fc, "fc"))],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def _inputs(count: int = 6) -> np.ndarray:
    return np.random.default_rng(1).normal(0.2, 1.0, (count, 3, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("residual", [False, True])
def test_relevance_is_conserved(residual: bool) -> None:
    model = _small(residual=residual)
    relevance = lrp_relevance(model, _inputs(), epsilon=1e-9)
    for name in ("logits", "f", "r2", "r1", "x"):  # r1: the second conv's input (and the Add's)
        per_sample = relevance[name].reshape(6, -1).sum(axis=1)
        np.testing.assert_allclose(per_sample, 1.0, atol=1e-3, err_msg=name)
    np.testing.assert_array_equal(relevance["r2"], relevance["a2"])  # Relu passes relevance through
    assert (relevance["logits"] == 1.0).sum() == 6  # one class per sample
    if not residual:  # the second conv follows the z+ rule: R_in = x * W+^T (R_out / W+ x)
        weights = {name: torch.tensor(v.const_value.numpy()) for name, v in model.graph.initializers.items()}
        r1 = torch.relu(F.conv2d(torch.from_numpy(_inputs()), weights["w1"], padding=1))
        positive = weights["w2"].clamp(min=0)
        ratio = torch.from_numpy(relevance["a2"]) / (F.conv2d(r1, positive, padding=1) + 1e-9)
        expected = r1 * F.conv_transpose2d(ratio, positive, padding=1)
        np.testing.assert_allclose(relevance["r1"], expected.numpy(), rtol=1e-4, atol=1e-7)


def _layer_classes(analysis: ChannelGraph, layer: str) -> dict[int, int]:
    """Class index of each output channel of the layer named ``layer``."""
    return {
        analysis.sources[members[0]].channel: index
        for index, members in enumerate(analysis.classes)
        if analysis.sources[members[0]].node.name == layer
    }


def test_dead_channel_ranks_last_and_a_used_one_first() -> None:
    model = _small(dead=2, strong=5)
    analysis = analyze(model.graph)
    scores = lrp_scores(model, analysis, _inputs(16), np.arange(16) % 4, batch_size=5)
    assert scores.shape == (len(analysis.classes),) and np.isfinite(scores).all()
    classes = _layer_classes(analysis, "conv2")
    layer = {channel: scores[index] for channel, index in classes.items()}
    assert layer[2] < 1e-6
    assert min(layer, key=layer.get) == 2
    assert max(layer, key=layer.get) == 5 and layer[5] > 2.0
    np.testing.assert_allclose(np.mean(list(layer.values())), 1.0, rtol=1e-6)  # normalised by the layer's mean


def test_predicted_classes_when_no_labels() -> None:
    model = _small()
    analysis = analyze(model.graph)
    x = _inputs(12)
    predicted = make_session(model).run(None, {"x": x})[0].argmax(axis=1)
    unlabelled = lrp_scores(model, analysis, x)
    assert np.isfinite(unlabelled).all()
    np.testing.assert_allclose(unlabelled, lrp_scores(model, analysis, x, predicted))
    other = (predicted + 1) % 4
    assert not np.allclose(unlabelled, lrp_scores(model, analysis, x, other))


def test_unsupported_op_is_named() -> None:
    model = _small(pool="ReduceL2")
    with pytest.raises(LrpUnsupportedError, match="ReduceL2 at node 'pool'") as caught:
        lrp_scores(model, analyze(model.graph), _inputs())
    assert isinstance(caught.value, ModelError)


def _demo() -> ir.Model:
    model = ir.load(DEMO / "demo.onnx")
    Pipeline(import_passes()).run(model, PassContext(), [])
    return model


def _pruned_top1(scores: np.ndarray, fraction: float, x: np.ndarray, y: np.ndarray) -> float:
    model = _demo()
    analysis = analyze(model.graph)
    assert len(analysis.classes) == len(scores)
    cost = MacsModel(model.graph, analysis, layer_shapes(model))
    fixed = max(compute_cost(model).macs - cost(np.zeros(len(analysis.classes), dtype=bool)), 0)
    choice = choose(analysis, scores, cost, fixed, fraction, round_to=8, min_keep=0.1)
    assert choice.fraction_removed >= fraction - 0.02
    remove_channels(model.graph, analysis, choice.removed)
    logits = make_session(model).run(None, {model.graph.inputs[0].name: x})[0]
    return float((logits.argmax(axis=1) == y).mean())


def test_demo_lrp_prunes_better_than_l1_without_fine_tuning() -> None:
    data = np.load(DEMO / "demo.npz")
    x, y = data["x"], data["y"]
    model = _demo()
    analysis = analyze(model.graph)
    few = np.concatenate([np.flatnonzero(y == c)[:10] for c in range(10)])  # 10 images per class
    scores = lrp_scores(model, analysis, x[few], y[few])
    assert scores.shape == (len(analysis.classes),) and np.isfinite(scores).all()
    l1 = l1_scores(analysis)
    for fraction in (0.2, 0.3):
        by_lrp, by_l1 = _pruned_top1(scores, fraction, x, y), _pruned_top1(l1, fraction, x, y)
        print(f"fraction {fraction}: top-1 LRP {by_lrp:.3f}, L1 {by_l1:.3f}")
        assert by_lrp >= by_l1 - 0.02
