"""The prune pass and stage on whole CNNs: MACs targets, channel rounding, validity, the CLI and recipes.

The architectures are the zoo's (`benchmarks.models`) with random weights, exported here by both
torch exporters; the zoo's trained models are measured in `benchmarks/prune.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from conftest import assert_close, random_input, run_onnx
from test_cli import assert_refused, make_model, run_cli

from benchmarks import models
from benchmarks.zoo_build import export
from compressor import compress
from compressor.errors import ConfigError
from compressor.metrics import compute_cost
from compressor.passes import import_passes
from compressor.passes.prune_channels import PruneChannels
from compressor.pipeline import PassContext, Pipeline
from compressor.pruning.channels import analyze
from compressor.pruning.config import PruneConfig
from compressor.pruning.surgery import remove_channels, zero_consumers
from compressor.recipe import Recipe

DEMO = Path(__file__).resolve().parent.parent / "compressor" / "demo"
FMNIST = ("resnet", "mobilenetv2", "squeezenet", "shufflenetv2", "vgg")


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each Fashion-MNIST architecture by the TorchScript exporter, and ShuffleNetV2 by the dynamo one too."""
    folder = tmp_path_factory.mktemp("prune_exports")
    paths = {}
    for name in FMNIST:
        torch.manual_seed(0)
        paths[name] = folder / f"{name}.onnx"
        export(models.ARCHITECTURES[name](), paths[name], dynamo=False)
    torch.manual_seed(0)
    paths["shufflenetv2_dynamo"] = folder / "shufflenetv2_dynamo.onnx"
    export(models.ARCHITECTURES["shufflenetv2"](), paths["shufflenetv2_dynamo"], dynamo=True)
    return paths


def imported(path: Path) -> ir.Model:
    model = ir.from_proto(onnx.load(path))
    Pipeline(import_passes()).run(model, PassContext(), [])
    return model


@pytest.mark.parametrize("name", [*FMNIST, "shufflenetv2_dynamo"])
def test_half_the_macs_go_and_the_model_stays_valid(name: str, exports: dict[str, Path]) -> None:
    model = imported(exports[name])
    before = compute_cost(model).macs
    prune = PruneChannels(PruneConfig(fraction=0.5))
    Pipeline([prune]).run(model, PassContext(), [])
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    after = compute_cost(model).macs
    assert after == prune.choice.macs_after, "the MACs model agrees with the measured count"
    assert 0.5 <= 1 - after / before <= 0.62
    for layer in prune.layers:
        assert layer["kept"] == layer["channels"] or layer["kept"] % 8 == 0, layer
    out = run_onnx(model, {"input": random_input((3, 1, 28, 28))})[0]
    assert out.shape == (3, 10) and np.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet", "squeezenet", "shufflenetv2_dynamo"])
def test_pass_removal_equals_zeroed_consumers(name: str, exports: dict[str, Path]) -> None:
    """The pass's own choice, removed, computes what the original does with those inputs zeroed."""
    model, twin = imported(exports[name]), imported(exports[name])
    prune = PruneChannels(PruneConfig(fraction=0.3))
    Pipeline([prune]).run(model, PassContext(), [])
    zero_consumers(twin.graph, analyze(twin.graph), prune.choice.removed)
    feeds = {"input": random_input((4, 1, 28, 28), seed=5)}
    assert_close(run_onnx(twin, feeds), run_onnx(model, feeds), rtol=1e-5)


def test_shape_computed_channel_shuffle_is_blocked_not_broken(exports: dict[str, Path]) -> None:
    """The TorchScript export computes its shuffle's shape from Shape(x): those channels stay, with the reason."""
    analysis = analyze(imported(exports["shufflenetv2"]).graph)
    assert any("Shape" in why for why in analysis.blocked.values())
    assert analysis.prunable


def test_config_refuses_impossible_settings() -> None:
    with pytest.raises(ConfigError, match="between 0 and 1"):
        PruneConfig(fraction=0.0)
    with pytest.raises(ConfigError, match="unknown prune method 'slimming'"):
        PruneConfig(method="slimming")
    with pytest.raises(ConfigError, match="round_to"):
        PruneConfig(round_to=0)


def test_removing_nothing_leaves_the_model_unchanged(exports: dict[str, Path]) -> None:
    model = imported(exports["resnet"])
    analysis = analyze(model.graph)
    before = ir.to_proto(model).SerializeToString()
    assert remove_channels(model.graph, analysis, np.zeros(len(analysis.classes), dtype=bool)) == 0
    assert ir.to_proto(model).SerializeToString() == before


def test_cli_prunes_the_demo_and_replays_byte_for_byte(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output, report = tmp_path / "p.onnx", tmp_path / "p.json"
    code, out, err = run_cli(["--demo", "--prune", "0.5", "--no-latency", "-o", output, "--report", report], capsys)
    assert code == 0, err
    record = next(p for p in json.loads(report.read_text())["passes"] if p["name"] == "prune_channels")
    assert record["macs_removed"] >= 0.5 and record["layers"]
    assert "accuracy may drop" in out + err
    original, pruned = onnx.load(DEMO / "demo.onnx"), onnx.load(output)
    assert compute_cost(pruned).macs <= 0.5 * compute_cost(original).macs
    assert pruned.ByteSize() < original.ByteSize()
    again = tmp_path / "again.onnx"
    code, _, err = run_cli([DEMO / "demo.onnx", "--recipe", report, "--calib", DEMO / "demo.npz", "-o", again], capsys)
    assert code == 0, err
    assert again.read_bytes() == output.read_bytes()


def test_prune_then_int8_in_one_command(tmp_path: Path) -> None:
    result = compress(
        DEMO / "demo.onnx", "int8", prune={"fraction": 0.3}, calib=DEMO / "demo.npz", progress=False,
        measure_latency=False, latency_guard=False,
    )  # fmt: skip
    names = [p["name"] for p in result.report.passes]
    assert names.index("prune_channels") < names.index("quantize_int8")
    assert [type(s).__name__ for s in result.recipe.stages] == ["PruneConfig", "QuantizeInt8Config"]
    assert any(n.op_type == "QLinearConv" for n in result.lowered.graph.node)
    assert compute_cost(result.model).macs <= 0.7 * compute_cost(onnx.load(DEMO / "demo.onnx")).macs


def test_recipe_orders_prune_before_quantization() -> None:
    with pytest.raises(ConfigError, match="'prune' must come before 'quantize_int8'"):
        Recipe.from_dict({"stages": [{"kind": "quantize_int8"}, {"kind": "prune", "fraction": 0.5}]})
    recipe = Recipe.from_dict({"stages": [{"kind": "prune", "fraction": 0.4, "round_to": 4}]})
    assert recipe.stages[0] == PruneConfig(fraction=0.4, round_to=4)
    assert Recipe.from_dict(recipe.to_dict()) == recipe


@pytest.mark.parametrize(
    ("flags", "keyword"),
    [
        (["--prune", "1.5"], "between 0 and 1"),
        (["--prune", "0"], "between 0 and 1"),
        (["--prune", "0.5", "--prune-method", "masksparsity"], "MaskSparsity trains the model: pass --train"),
        (["--prune", "0.5", "--prune-method", "lrp"], "LRP pruning needs reference data"),
        (["--prune-round-to", "4"], "need --prune"),
    ],
)
def test_cli_refuses_bad_prune_flags(
    flags: list[str], keyword: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = make_model(tmp_path / "m.onnx")
    assert_refused([model, *flags, "--no-latency"], keyword, tmp_path, capsys)


def test_cli_on_a_model_with_nothing_prunable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proto = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Relu", ["input"], ["output"])], "relu",
            [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 4])],
            [onnx.helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["N", 4])],
        ), opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8,
    )  # fmt: skip
    path = tmp_path / "relu.onnx"
    onnx.save(proto, path)
    assert_refused([path, "--prune", "0.5", "--no-latency"], "nothing in this model can be pruned", tmp_path, capsys)


def test_torch_is_imported_only_for_training_based_pruning() -> None:
    """torch costs about 190 MB at import: the int8 path and L1 pruning must not pay it."""
    script = (
        "import sys; from compressor import compress; "
        f"compress({str(DEMO / 'demo.onnx')!r}, 'int8', prune={{'fraction': 0.3}}, calib={str(DEMO / 'demo.npz')!r}, "
        "progress=False, measure_latency=False, latency_guard=False); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
