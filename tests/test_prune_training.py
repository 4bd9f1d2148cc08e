"""Pruning with data: mean compensation, fine-tuning through the torch bridge, and the bad-data errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import float_model, random_input, run_onnx
from onnx import helper
from test_cli import assert_refused, make_model
from test_pruning_channels import conv_weights, imported

from compressor import compress, runtime
from compressor.errors import DataError
from compressor.fashion_mnist import load_fashion_mnist
from compressor.pruning.channels import analyze
from compressor.pruning.compensation import compensate_means
from compressor.pruning.surgery import remove_channels

DEMO = Path(__file__).resolve().parent.parent / "compressor" / "demo"


@pytest.fixture(scope="module")
def train_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3000 Fashion-MNIST training images (not the demo's evaluation ones), scaled as the demo expects."""
    x, y = load_fashion_mnist("train")
    path = tmp_path_factory.mktemp("train") / "train.npz"
    np.savez(path, x=(x[:3000, None] / 255.0).astype(np.float32), y=y[:3000].astype(np.int64))
    return path


def demo_top1(model: ir.Model | onnx.ModelProto) -> float:
    data = np.load(DEMO / "demo.npz")
    logits = runtime.make_session(model).run(None, {"input": data["x"]})[0]
    return float((logits.argmax(axis=1) == data["y"]).mean())


def test_compensation_is_exact_for_a_constant_channel() -> None:
    """A channel that is constant (zero filter, positive bias) is removed with no change at all once compensated."""
    inits = conv_weights("wa", 8, 3) + conv_weights("wb", 4, 8)
    weight, bias = onnx.numpy_helper.to_array(inits[0]).copy(), onnx.numpy_helper.to_array(inits[1]).copy()
    weight[2], bias[2] = 0.0, 0.7
    inits[:2] = [onnx.numpy_helper.from_array(weight, "wa"), onnx.numpy_helper.from_array(bias, "wa_b")]
    nodes = [
        helper.make_node("Conv", ["input", "wa", "wa_b"], ["ya"], name="a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["ya"], ["ra"]),
        helper.make_node("Conv", ["ra", "wb", "wb_b"], ["output"], name="b"),  # no padding: the mean is exact
    ]
    proto = float_model("constant", nodes, inits, ([2, 3, 8, 8], [2, 4, 6, 6]))
    feeds = {"input": random_input((2, 3, 8, 8), seed=4)}
    for compensate, exact in ((False, False), (True, True)):
        model = imported(proto)
        analysis = analyze(model.graph)
        removed = np.zeros(len(analysis.classes), dtype=bool)
        removed[next(i for i, c in enumerate(analysis.classes) if analysis.sources[c[0]].channel == 2)] = True
        if compensate:
            assert compensate_means(model, analysis, removed, [feeds]) == ["b"]
        remove_channels(model.graph, analysis, removed)
        error = np.abs(run_onnx(model, feeds)[0] - run_onnx(proto, feeds)[0]).max()
        assert (error < 1e-5) == exact, error


def test_compensation_helps_without_training() -> None:
    """On the demo at 10% of the MACs, calibration data alone recovers most of the top-1 lost."""
    tops = []
    for calib in (None, DEMO / "demo.npz"):
        result = compress(DEMO / "demo.onnx", prune={"fraction": 0.1}, calib=calib, progress=False,
                          measure_latency=False, measure_fidelity=False)  # fmt: skip
        tops.append(demo_top1(result.model))
    assert tops[1] > tops[0] + 0.1, tops


def test_fine_tuning_recovers_the_accuracy(train_npz: Path) -> None:
    plain = compress(DEMO / "demo.onnx", prune={"fraction": 0.5}, progress=False, measure_latency=False)
    tuned = compress(DEMO / "demo.onnx", prune={"fraction": 0.5, "epochs": 2}, train=train_npz, progress=False,
                     measure_latency=False, measure_fidelity=False)  # fmt: skip
    record = next(p for p in tuned.report.passes if p["name"] == "prune_channels")
    assert 1 <= len(record["fine_tuning"]) <= 2 and record["compensated"]
    assert demo_top1(tuned.model) > max(demo_top1(plain.model) + 0.3, 0.8)
    onnx.checker.check_model(ir.to_proto(tuned.model), full_check=True)
    again = compress(DEMO / "demo.onnx", recipe=tuned.recipe, train=train_npz, progress=False)
    assert ir.to_proto(again.model).SerializeToString() == ir.to_proto(tuned.model).SerializeToString()


def test_labels_outside_the_outputs_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, x=random_input((40, 1, 28, 28)), y=np.full(40, 12, dtype=np.int64))
    with pytest.raises(DataError, match=r"12.*outputs 10 classes"):
        compress(DEMO / "demo.onnx", prune={"fraction": 0.5, "epochs": 1}, train=path, progress=False)
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, x=random_input((40, 1, 28, 28)))
    with pytest.raises(DataError, match="no labels"):
        compress(DEMO / "demo.onnx", prune={"fraction": 0.5}, train=unlabelled, progress=False)


@pytest.mark.parametrize(
    ("flags", "keyword"),
    [
        (["--train", "{data}"], "need --prune"),
        (["--prune", "0.5", "--epochs", "2"], "need --train"),
        (["--prune", "0.5", "--train", "{data}", "--epochs", "0"], "--epochs must be >= 1"),
        (["--prune", "0.5", "--train", "missing.npz"], "--train not found"),
        (["--prune", "0.5", "--train", "{wrong}"], "wrong.npz: array 'x' has shape (8, 3, 8, 8)"),
    ],
)
def test_cli_refuses_bad_training_flags(
    flags: list[str], keyword: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = make_model(tmp_path / "m.onnx")  # input [N, 1, 8, 8], 3 classes
    data, wrong = tmp_path / "d.npz", tmp_path / "wrong.npz"
    np.savez(data, x=random_input((8, 1, 8, 8)), y=np.zeros(8, dtype=np.int64))
    np.savez(wrong, x=random_input((8, 3, 8, 8)), y=np.zeros(8, dtype=np.int64))
    argv = [model, *(f.format(data=data, wrong=wrong) for f in flags), "--no-latency"]
    assert_refused(argv, keyword, tmp_path, capsys)


def test_lrp_prunes_better_than_l1_without_training(train_npz: Path) -> None:
    """The paper's claim, through the pass: with 3000 reference images and no fine-tuning, relevance beats magnitude."""
    tops = {}
    for method in ("l1", "lrp"):
        result = compress(DEMO / "demo.onnx", prune={"fraction": 0.3, "method": method}, calib=train_npz,
                          progress=False, measure_latency=False, measure_fidelity=False)  # fmt: skip
        record = next(p for p in result.report.passes if p["name"] == "prune_channels")
        assert record["macs_removed"] >= 0.3
        tops[method] = demo_top1(result.model)
    assert tops["lrp"] > tops["l1"] + 0.2, tops


def test_masksparsity_through_the_pass(train_npz: Path) -> None:
    result = compress(DEMO / "demo.onnx", prune={"fraction": 0.5, "method": "masksparsity", "epochs": 1,
                      "sparse_epochs": 1}, train=train_npz, progress=False, measure_latency=False,
                      measure_fidelity=False)  # fmt: skip
    record = next(p for p in result.report.passes if p["name"] == "prune_channels")
    assert record["macs_removed"] >= 0.5 and len(record["fine_tuning"]) == 1
    assert record["masksparsity"]["gamma_masked_mean"] < 0.5 * record["masksparsity"]["gamma_kept_mean"]
    assert demo_top1(result.model) > 0.8
    onnx.checker.check_model(ir.to_proto(result.model), full_check=True)
