"""MaskSparsity: γ scales inserted and folded exactly, the masked channels shrink, and the demo end to end."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from conftest import float_model, random_input, run_onnx
from onnx import helper
from test_pruning_channels import conv_weights, imported, weight

from compressor import runtime
from compressor.fashion_mnist import load_fashion_mnist
from compressor.ir import load_model, to_proto
from compressor.metrics import compute_cost, layer_shapes
from compressor.passes import import_passes
from compressor.pipeline import PassContext, Pipeline
from compressor.pruning.channels import ChannelGraph, analyze
from compressor.pruning.masksparsity import (
    MaskSparsityResult,
    MaskSparsitySettings,
    _Data,
    _Scaled,
    _train,
    masksparsity,
)
from compressor.pruning.selection import MacsModel, choose, l1_scores
from compressor.pruning.surgery import remove_channels
from compressor.training import TrainSettings, fine_tune

DEMO = Path(__file__).resolve().parent.parent / "compressor" / "demo"


def every_layer_kind() -> onnx.ModelProto:
    """Conv with and without bias, a residual Add, Gemm with transB 1 and 0, a MatMul: every fold there is."""
    inits = [
        *conv_weights("wa", 8, 3),
        weight("wb", 8, 8, 3, 3),
        weight("g1", 16, 8),
        weight("g1_b", 16),
        weight("g2", 16, 12),
        weight("g2_b", 12),
        weight("mm", 12, 6),
        weight("out", 4, 6),
        weight("out_b", 4),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "wa", "wa_b"], ["ya"], name="a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["ya"], ["ra"]),
        helper.make_node("Conv", ["ra", "wb"], ["yb"], name="b", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["ya", "yb"], ["sum"], name="residual"),
        helper.make_node("GlobalAveragePool", ["sum"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "g1", "g1_b"], ["h1"], name="g1", transB=1),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Gemm", ["r1", "g2", "g2_b"], ["h2"], name="g2", alpha=0.5),
        helper.make_node("Tanh", ["h2"], ["r2"]),
        helper.make_node("MatMul", ["r2", "mm"], ["h3"], name="mm"),
        helper.make_node("Sigmoid", ["h3"], ["r3"]),
        helper.make_node("Gemm", ["r3", "out", "out_b"], ["output"], name="out", transB=1),
    ]
    return float_model("kinds", nodes, inits, (["batch", 3, 8, 8], ["batch", 4]))


def structure(model: ir.Model) -> list[tuple[Any, ...]]:
    """Everything about the graph but the weights' values."""
    nodes = [(n.op_type, n.name, [v.name if v else None for v in n.inputs], [v.name for v in n.outputs])
             for n in model.graph]  # fmt: skip
    inits = [(name, v.const_value.shape) for name, v in model.graph.initializers.items()]
    return [*nodes, *inits, [v.name for v in model.graph.outputs]]


def half_the_prunable(analysis: ChannelGraph) -> Callable[[np.ndarray], np.ndarray]:
    """A chooser: the lower-scored half of the prunable classes."""

    def chooser(scores: np.ndarray) -> np.ndarray:
        removed = np.zeros(len(analysis.classes), dtype=bool)
        order = sorted(analysis.prunable, key=lambda c: scores[c])
        removed[order[: len(order) // 2]] = True
        return removed

    return chooser


def toy_data(count: int = 64, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    x = random_input((count, 3, 8, 8), seed=seed)
    return x, np.random.default_rng(seed).integers(0, 4, count).astype(np.int64)


def test_without_training_the_model_is_unchanged() -> None:
    """With no epochs every γ stays 1: folding it changes nothing, and the graph keeps its nodes."""
    model = imported(every_layer_kind())
    before, original = structure(model), to_proto(model)
    analysis = analyze(model.graph)
    x, y = toy_data()
    settings = MaskSparsitySettings(mask_epochs=0, epochs=0)
    result = masksparsity(model, analysis, x, y, None, half_the_prunable(analysis), settings)
    assert structure(model) == before
    assert result.scales == 5 and result.removed.sum() == len(analysis.prunable) // 2
    assert result.gamma_masked_mean == result.gamma_kept_mean == 1.0
    feeds = {"input": x[:8]}
    np.testing.assert_allclose(run_onnx(model, feeds)[0], run_onnx(original, feeds)[0], rtol=1e-5, atol=1e-5)


def test_folding_after_training_is_exact() -> None:
    """The trained model with its Mul(γ) nodes (in torch) computes what the folded one does in onnxruntime."""
    model = imported(every_layer_kind())
    before, original = structure(model), to_proto(model)
    analysis = analyze(model.graph)
    scaled = _Scaled(model, analysis)
    assert sorted(layer.axis for layer in scaled.layers.values()) == [0, 0, 0, 1, 1]  # Conv x2, transB: rows
    x, y = toy_data()
    bridge = scaled.bridge()
    gammas = list(scaled.gammas(bridge).values())
    settings = MaskSparsitySettings(lr=1e-2, batch_size=16)
    _train(bridge, _Data(x, y, None, settings), 2, [(g, torch.full_like(g, 0.01)) for g in gammas], 0, False, "test")
    spread = np.concatenate([g.detach().numpy().ravel() for g in gammas])
    assert spread.std() > 0.01, spread  # the scales really moved apart
    with torch.no_grad():  # and far apart, some negative: folding must hold for any γ
        for index, gamma in enumerate(gammas):
            gamma.mul_(torch.from_numpy(np.random.default_rng(index).uniform(-0.5, 2.0, gamma.shape)).float())
    feeds = {"input": x[:8]}
    with torch.no_grad():
        bridge.eval()
        expected = bridge(torch.from_numpy(feeds["input"]))[0].numpy()
    scaled.fold_into(bridge, model)
    assert structure(model) == before
    folded = run_onnx(model, feeds)[0]
    np.testing.assert_allclose(folded, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(folded - run_onnx(original, feeds)[0]).max() > 1e-2  # the weights did change


def test_the_chooser_must_give_one_bool_per_class() -> None:
    model = imported(every_layer_kind())
    analysis = analyze(model.graph)
    x, y = toy_data(8)
    with pytest.raises(Exception, match="one bool per class"):
        masksparsity(model, analysis, x, y, None, lambda s: s[:3] > 0, MaskSparsitySettings(0, 0))


def demo_model() -> ir.Model:
    model = load_model(DEMO / "demo.onnx")
    Pipeline(import_passes()).run(model, PassContext(), [])
    return model


def demo_top1(model: ir.Model) -> float:
    data = np.load(DEMO / "demo.npz")
    logits = runtime.make_session(model).run(None, {"input": data["x"]})[0]
    return float((logits.argmax(axis=1) == data["y"]).mean())


def macs_chooser(model: ir.Model, analysis: ChannelGraph, fraction: float) -> Callable[[np.ndarray], np.ndarray]:
    """As `passes/prune_channels.py` does: the global choice under a MACs target."""
    cost = MacsModel(model.graph, analysis, layer_shapes(model))
    fixed = max(compute_cost(model).macs - cost(np.zeros(len(analysis.classes), dtype=bool)), 0)
    return lambda scores: choose(analysis, scores, cost, fixed, fraction, 8, 0.1).removed


@pytest.fixture(scope="module")
def demo_runs() -> dict[str, Any]:
    """MaskSparsity and plain L1 on the demo at half the MACs, each fine-tuned one epoch on the same 2000 images."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine one thread runs 4x faster than two
    try:
        return _demo_runs()
    finally:
        torch.set_num_threads(threads)


def _demo_runs() -> dict[str, Any]:
    images, labels = load_fashion_mnist("train")
    x, y = (images[:2000, None] / 255.0).astype(np.float32), labels[:2000].astype(np.int64)
    teacher = runtime.make_session(demo_model()).run(None, {"input": x})[0]
    runs: dict[str, Any] = {}
    for method in ("masksparsity", "l1"):
        model = demo_model()
        analysis = analyze(model.graph)
        chooser = macs_chooser(model, analysis, 0.5)
        start = time.perf_counter()
        if method == "l1":
            removed = chooser(l1_scores(analysis))
        else:
            runs["result"] = masksparsity(model, analysis, x, y, teacher, chooser, MaskSparsitySettings())
            removed = runs["result"].removed
        remove_channels(model.graph, analysis, removed)
        fine_tune(model, x, y, teacher, TrainSettings(epochs=1))
        runs[method] = (demo_top1(model), time.perf_counter() - start, compute_cost(model).macs)
    print(f"demo, half the MACs, 1 epoch of fine-tuning: (top-1, seconds, MACs) {runs['masksparsity']} for "
          f"MaskSparsity, {runs['l1']} for L1; {runs['result'].as_dict()}")  # fmt: skip
    return runs


def test_the_masked_gammas_shrink(demo_runs: dict[str, Any]) -> None:
    result: MaskSparsityResult = demo_runs["result"]
    assert result.removed.any() and result.sparse_losses and result.mask_losses
    assert result.gamma_masked_mean < 0.5 * result.gamma_kept_mean, result.as_dict()


def test_demo_end_to_end(demo_runs: dict[str, Any]) -> None:
    """Half the MACs off the demo, then one epoch of fine-tuning: MaskSparsity keeps a usable model."""
    top1, _, macs = demo_runs["masksparsity"]
    assert macs <= 0.55 * compute_cost(demo_model()).macs
    assert top1 > 0.6, demo_runs
