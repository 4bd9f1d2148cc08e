"""Recipes: round trips through TOML, JSON and the report, replay byte for byte, and the bad-recipe errors."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import sys
from pathlib import Path

import onnx
import pytest
from test_cli import assert_refused, make_model, run_cli

from compressor import compress
from compressor.backends import onnxruntime_cpu
from compressor.backends.conv_kernels import OFFSET_ZERO_NAME, gemm_path_candidates
from compressor.backends.latency_guard import int8_islands
from compressor.config import NONE, from_mapping, search_space, to_mapping
from compressor.errors import ConfigError, UsageError
from compressor.quantization.int8_config import QuantizeInt8Config
from compressor.recipe import BackendSettings, GuardSettings, MeasureSettings, Recipe
from compressor.stages import STAGES
from compressor.stages.quantize_int8 import PINNED_WHY

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEMO = Path(__file__).resolve().parent.parent / "compressor" / "demo"
DEMO_ONNX, DEMO_NPZ = DEMO / "demo.onnx", DEMO / "demo.npz"
QUICK = {"measure_latency": False, "measure_fidelity": False, "progress": False}


def digest(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def rich_recipe() -> Recipe:
    """A recipe that sets a value of every kind: None, floats, sets, pinned tuples."""
    int8 = {"calibration": "percentile", "percentile": 99.9, "keep_float": {"b", "a"}, "min_sqnr_db": None}
    recipe = Recipe.from_options("int8", threads=3, seed=7, measure_latency=False, int8=int8, explain=True)
    return recipe.pinned(("conv1", "conv0"), {"gemm_convs": ("conv2",)})


def test_recipe_round_trips_through_toml_and_json(tmp_path: Path) -> None:
    recipe = rich_recipe()
    assert Recipe.from_dict(tomllib.loads(recipe.to_toml())) == recipe
    assert Recipe.from_dict(json.loads(recipe.to_json())) == recipe
    for name in ("r.toml", "r.json"):
        recipe.save(tmp_path / name)
        assert Recipe.load(tmp_path / name) == recipe
    stage = recipe.stages[0]
    assert stage.keep_float == frozenset({"a", "b"}) and stage.min_sqnr_db is None and stage.explain
    assert recipe.guard.float_islands == ("conv1", "conv0") and recipe.backend.gemm_convs == ("conv2",)
    assert tomllib.loads(recipe.to_toml())["stages"][0]["min_sqnr_db"] == NONE


def test_a_partial_file_takes_the_backend_preferences_then_the_defaults(tmp_path: Path) -> None:
    file = tmp_path / "r.toml"
    file.write_text('[[stages]]\nkind = "quantize_int8"\ncalibration = "entropy"\n')
    recipe = Recipe.load(file)
    assert recipe == Recipe.from_options("int8", int8={"calibration": "entropy"})
    assert recipe.target == "int8" and Recipe().target == "fp32"


def test_every_tunable_field_has_a_domain_of_valid_values() -> None:
    for stage in STAGES.values():
        space = search_space(stage.config_class)
        assert space, f"{stage.kind} declares nothing the tuner can search"
        default = stage.config_class()
        for name, domain in space.items():
            assert getattr(default, name) in domain, name
            for value in domain:  # every point of the space is a config the stage accepts
                config = dataclasses.replace(default, **{name: value})
                assert from_mapping(stage.config_class, to_mapping(config), "t") == config
    # The tuner enumerates the product; it is finite and every corner builds.
    space = search_space(QuantizeInt8Config)
    corners = list(itertools.product(*[(d[0], d[-1]) for d in space.values()]))
    assert len(corners) == 2 ** len(space)
    for values in corners:
        QuantizeInt8Config(**dict(zip(space, values, strict=True)))


@pytest.mark.parametrize(
    ("data", "keyword"),
    [
        ({"colour": 1}, "'colour'"),
        ({"seed": "x"}, "recipe.seed"),
        ({"seed": -1}, "seed"),
        ({"version": 2}, "version"),
        ({"backend": {"name": "tpu"}}, "backend.name"),
        ({"backend": {"threads": 1.5}}, "backend.threads"),
        ({"backend": {"format": "qdq", "gemm_convs": ["c"]}}, "backend.gemm_convs"),
        ({"backend": "cpu"}, "backend: expected a table"),
        ({"guard": {"latency": False, "float_islands": ["c"]}}, "guard.float_islands"),
        ({"guard": {"float_islands": ["c"]}}, "guard.float_islands"),
        ({"measure": {"latency": "yes"}}, "measure.latency"),
        ({"stages": [{"kind": "quantize_int8", "calibrtion": "minmax"}]}, "stages[0]: unknown key 'calibrtion'"),
        ({"stages": [{"kind": "quantize_int8", "num_samples": "many"}]}, "stages[0].num_samples"),
        ({"stages": [{"kind": "quantize_int8", "keep_float": "conv0"}]}, "stages[0].keep_float"),
        ({"stages": [{"kind": "quantize_int8", "calibration": "bogus"}]}, "calibration='bogus'"),
        ({"stages": [{"kind": "sparsify"}]}, "stages[0].kind"),
        ({"stages": [{"kind": "lowrank"}]}, "not implemented yet"),
        ({"stages": [{"kind": "prune", "fraction": 1.0}]}, "between 0 and 1"),
        ({"stages": [{"kind": "quantize_int8"}, {"kind": "quantize_int8"}]}, "stages[1].kind"),
        ({"stages": [{"kind": "quantize_int8"}, {"kind": "quantize_int16"}]}, "keep one"),
        ({"stages": [{"kind": "quantize_int16", "calibration": "entropy"}]}, "calibration='entropy'"),
        ({"stages": {"kind": "quantize_int8"}}, "stages: expected a list"),
    ],
)
def test_bad_recipes_name_the_key(data: dict[str, object], keyword: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Recipe.from_dict(data)
    message = str(caught.value)
    assert keyword in message and "\n" not in message, message


def test_a_report_recipe_reruns_byte_for_byte(tmp_path: Path) -> None:
    """The defaults time things (latency guard, AMX conv kernels); the stored recipe pins what they chose."""
    first = compress(DEMO_ONNX, "int8", calib=DEMO_NPZ, **QUICK)
    assert first.recipe.guard.float_islands is not None, "the guard ran and its choice is pinned"
    assert first.recipe.backend.gemm_convs is not None
    assert first.report.recipe == first.recipe.to_dict()
    first.report.write_json(tmp_path / "report.json")
    assert Recipe.load(tmp_path / "report.json") == first.recipe
    again = compress(DEMO_ONNX, recipe=tmp_path / "report.json", calib=DEMO_NPZ, progress=False)
    assert digest(again.lowered) == digest(first.lowered)
    assert again.recipe == first.recipe


def test_pinned_gemm_convs_move_those_convs_to_the_gemm_path_without_profiling() -> None:
    base = Recipe.from_options("int8", measure_latency=False, measure_fidelity=False, int8={"min_sqnr_db": None})
    plain = compress(DEMO_ONNX, recipe=base.pinned((), {"gemm_convs": ()}), calib=DEMO_NPZ, progress=False)
    assert all(n.input[5] != OFFSET_ZERO_NAME for n in plain.lowered.graph.node if n.op_type == "QLinearConv")
    chosen = sorted(gemm_path_candidates(plain.lowered))[:2]
    assert chosen, "the demo has dense convs that may take the GEMM path"
    recipe = base.pinned((), {"gemm_convs": tuple(chosen)})
    result = compress(DEMO_ONNX, recipe=recipe, calib=DEMO_NPZ, progress=False)
    on_gemm = {
        n.name for n in result.lowered.graph.node if n.op_type == "QLinearConv" and n.input[5] == OFFSET_ZERO_NAME
    }
    assert on_gemm == set(chosen)
    assert result.report.lowering["conv_on_gemm_path"] == chosen and result.recipe == recipe


def test_pinned_float_islands_are_put_in_float_without_timing() -> None:
    base = Recipe.from_options("int8", measure_latency=False, measure_fidelity=False, int8={"min_sqnr_db": None})
    plain = compress(DEMO_ONNX, recipe=base.pinned((), {}), calib=DEMO_NPZ, progress=False)
    island = sorted(int8_islands(plain.model)[0])
    result = compress(DEMO_ONNX, recipe=base.pinned(tuple(island), {}), calib=DEMO_NPZ, progress=False)
    ops = {node.op_type for node in result.lowered.graph.node}
    assert not ops & {"QLinearConv", "QLinearAdd", "QGemm", "QuantizeLinear"}, ops
    assert all(result.report.kept_float[name].startswith(PINNED_WHY) for name in island)
    again = compress(DEMO_ONNX, recipe=result.recipe, calib=DEMO_NPZ, progress=False)
    assert digest(again.lowered) == digest(result.lowered)
    with pytest.raises(ConfigError, match=r"guard\.float_islands: 'no_such_node'"):
        compress(DEMO_ONNX, recipe=base.pinned(("no_such_node",), {}), calib=DEMO_NPZ, progress=False)


def test_recipe_and_job_keywords_do_not_mix() -> None:
    with pytest.raises(UsageError, match="drop target='int8', seed"):
        compress(DEMO_ONNX, "int8", recipe=Recipe(), seed=1)


def test_cli_print_recipe_then_recipe_reproduces_the_flags_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The printed recipe leaves the AMX conv-kernel choice to profiling, as the flags do: off here so
    # that two profiles cannot differ (the report's recipe pins it; see the test above).
    monkeypatch.setattr(onnxruntime_cpu, "cpu_has_amx", lambda: False)
    flags = ["--target", "int8", "--calibration", "percentile", "--keep-slow-int8", "--no-latency", "--no-fidelity"]
    code, out, _ = run_cli([*flags, "--print-recipe"], capsys)
    assert code == 0
    printed = Recipe.from_dict(tomllib.loads(out))
    assert printed.stages[0].calibration == "percentile" and not printed.guard.latency
    (tmp_path / "r.toml").write_text(out)
    data = ["--calib", str(DEMO_NPZ)]
    code, _, err = run_cli([str(DEMO_ONNX), *flags, *data, "-o", str(tmp_path / "a.onnx"), "--report",
                            str(tmp_path / "a.json")], capsys)  # fmt: skip
    assert code == 0, err
    for source in ("r.toml", "a.json"):
        output = tmp_path / f"{source}.onnx"
        code, _, err = run_cli([str(DEMO_ONNX), "--recipe", str(tmp_path / source), *data, "-o", str(output)], capsys)
        assert code == 0, err
        assert output.read_bytes() == (tmp_path / "a.onnx").read_bytes(), source


def test_cli_default_output_name_follows_the_recipe_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_model(tmp_path / "model.onnx")
    Recipe(measure=MeasureSettings(latency=False)).save(tmp_path / "r.toml")
    code, _, err = run_cli([str(model), "--recipe", str(tmp_path / "r.toml")], capsys)
    assert code == 0, err
    assert (tmp_path / "model.fp32.onnx").is_file()


@pytest.mark.parametrize(
    ("text", "extra", "keyword"),
    [
        ("colour = 1\n", [], "unknown key 'colour'"),
        ('[[stages]]\nkind = "quantize_int8"\nnum_samples = "many"\n', [], "stages[0].num_samples"),
        ('[backend]\nformat = "qdq"\ngemm_convs = ["c"]\n', [], "backend.gemm_convs"),
        ("seed = \n", [], "not a valid recipe file"),
        ("", ["--target", "int8"], "drop --target"),
        ("", ["--no-latency", "--seed", "3"], "drop --seed, --no-latency"),
    ],
)
def test_cli_refuses_bad_recipes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, extra: list[str], keyword: str
) -> None:
    model = make_model(tmp_path / "model.onnx")
    (tmp_path / "r.toml").write_text(text)
    assert_refused([str(model), "--recipe", str(tmp_path / "r.toml"), *extra], keyword, tmp_path, capsys)


def test_cli_refuses_a_missing_recipe_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_model(tmp_path / "model.onnx")
    assert_refused([str(model), "--recipe", str(tmp_path / "nope.toml")], "recipe file not found", tmp_path, capsys)


def test_settings_reject_impossible_values() -> None:
    with pytest.raises(ConfigError, match=r"backend\.threads"):
        BackendSettings(threads=0)
    with pytest.raises(ConfigError, match=r"guard\.float_islands needs guard\.latency"):
        GuardSettings(latency=False, float_islands=())
