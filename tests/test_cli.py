"""Tests for the ``compress`` command line: exit codes, one-line errors, safe output."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.cli import main

COMPRESS = Path(sys.executable).with_name("compress")
DEMO_MODEL = Path(__file__).resolve().parent.parent / "compressor" / "demo" / "demo.onnx"
HAVE_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def make_model(path: Path, external: tuple[str, int] | None = None) -> Path:
    """Write a tiny CNN (Conv-Relu-GAP-Flatten-Gemm, 3 classes) to ``path``.

    ``external=(location, nbytes)`` stores the Conv weight as external data at
    ``location`` (relative to the model) holding only its first ``nbytes`` bytes.
    """
    rng = np.random.default_rng(0)
    shapes = {"conv_w": (4, 1, 3, 3), "conv_b": (4,), "fc_w": (3, 4), "fc_b": (3,)}
    weights = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    nodes = [
        helper.make_node("Conv", ["input", "conv_w", "conv_b"], ["conv"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    if external is not None:
        location, nbytes = external
        tensor = model.graph.initializer[0]
        data = tensor.raw_data
        (path.parent / location).write_bytes(data[:nbytes])
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", "0"), ("length", str(len(data)))):
            tensor.external_data.add(key=key, value=value)
    path.write_bytes(model.SerializeToString())
    return path


def make_npz(path: Path, n: int = 6, **overrides: np.ndarray | None) -> Path:
    """Write ``x`` [n,1,8,8] float32 and ``y`` [n] int64; overrides replace (or with None drop) keys."""
    rng = np.random.default_rng(1)
    arrays = {"x": rng.standard_normal((n, 1, 8, 8)).astype(np.float32), "y": rng.integers(0, 3, n)}
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) with its sha256."""
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``compress`` in-process; returns (exit status, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's --help exits directly
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(argv: Sequence[str], keyword: str, folder: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Exit 2 with one 'compress: error:' line naming ``keyword``; nothing under ``folder`` changes."""
    before = snapshot(folder)
    model = Path(argv[0]) if argv and Path(argv[0]).is_file() else None
    model_hash = sha256(model) if model is not None else None
    code, _, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("compress: error:"), err
    assert "Traceback" not in err
    message = lines[0].replace(str(folder), "<tmp>")  # the tmp path holds the test id: keep it out of the match
    assert keyword.lower() in message.lower(), lines[0]
    if model is not None:
        assert sha256(model) == model_hash, "the input model was modified"
    assert snapshot(folder) == before, "files were written or changed on a refused run"
    return lines[0]


def case(name: str, args: str, keyword: str) -> object:
    """A parameter set: space-separated extra args and the keyword the error must contain."""
    return pytest.param(args.split(), keyword, id=name)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_model(tmp_path / "model.onnx")


def _truncated(folder: Path) -> Path:
    path = make_model(folder / "model.onnx")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _written(folder: Path, data: bytes) -> Path:
    path = folder / "model.onnx"
    path.write_bytes(data)
    return path


def _outside(folder: Path) -> Path:
    (folder / "m").mkdir()
    return make_model(folder / "m" / "model.onnx", external=("../outside.bin", 144))  # writes tmp/outside.bin


@pytest.mark.parametrize(
    ("build", "keyword"),
    [
        (lambda folder: folder / "missing.onnx", "not found"),
        (_truncated, "not a valid onnx"),
        (lambda folder: _written(folder, random.Random(0).randbytes(4096)), "not a valid onnx"),
        (lambda folder: _written(folder, b""), "empty"),
        (_outside, "outside the model folder"),
        (lambda folder: make_model(folder / "model.onnx", external=("weights.bin", 100)), "truncated"),
    ],
    ids=["missing", "truncated", "random-bytes", "empty", "external-outside", "external-short"],
)
def test_bad_model_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], build: Callable[[Path], Path], keyword: str
) -> None:
    path = build(tmp_path)
    assert_refused([path, "--target", "fp32", "--no-latency"], keyword, tmp_path, capsys)


def poisoned(value: float, sample: int = 3) -> np.ndarray:
    """Clean ``x`` of 6 samples with one element of ``sample`` set to ``value``."""
    x = np.random.default_rng(2).standard_normal((6, 1, 8, 8)).astype(np.float32)
    x[sample, 0, 4, 5] = value
    return x


def _not_a_zip(path: Path) -> Path:
    path.write_text("x,y\n1,2\n")
    return path


BAD_DATA: dict[str, tuple[Callable[[Path], Path], str]] = {
    "wrong-shape": (lambda p: make_npz(p, x=np.zeros((6, 1, 9, 9), np.float32)), "shape"),
    "float64": (lambda p: make_npz(p, x=np.zeros((6, 1, 8, 8), np.float64)), "float64"),
    "nan": (lambda p: make_npz(p, x=poisoned(np.nan)), "NaN or Inf at sample 3"),
    "inf": (lambda p: make_npz(p, x=poisoned(-np.inf)), "NaN or Inf at sample 3"),
    "zero-samples": (lambda p: make_npz(p, n=0), "zero samples"),
    "no-x": (lambda p: make_npz(p, x=None, z=np.zeros((6, 1, 8, 8), np.float32)), "'x'"),
    "labels-length": (lambda p: make_npz(p, y=np.zeros(5, np.int64)), "labels"),
    "not-a-zip": (_not_a_zip, "not an .npz"),
}


@pytest.mark.parametrize("flag", ["--calib", "--eval"])
@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_refused(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str], case: str, flag: str
) -> None:
    build, keyword = BAD_DATA[case]
    data = build(tmp_path / "data.npz")
    data_hash = sha256(data)
    assert_refused([model, "--target", "fp32", flag, data, "--no-latency"], keyword, tmp_path, capsys)
    assert sha256(data) == data_hash


@pytest.mark.parametrize("case", ["nan", "inf"])
def test_bad_calibration_values_stop_int8_before_any_output(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    """Calibration data is not read through up front: calibration's own read must refuse it."""
    build, keyword = BAD_DATA[case]
    data = build(tmp_path / "data.npz")
    assert_refused([model, "--target", "int8", "--calib", data, "--no-latency"], keyword, tmp_path, capsys)


@pytest.mark.parametrize(
    ("extra", "keyword"),
    [
        case("int4", "--target int4", "unknown target"),
        case("int8-without-calibration", "--target int8", "--calib"),
        case("int16-without-calibration", "--target int16", "--calib"),
        case("prune-lrp-without-data", "--prune 0.5 --prune-method lrp", "needs reference data"),
        case("lowrank", "--lowrank 0.5", "not implemented"),
        case("tune", "--tune 10", "not implemented"),
        case("unknown-flag", "--bogus-flag", "--bogus-flag"),
        case("seed-not-int", "--seed many", "--seed"),
        case("report-folder-missing", "--report no/such/dir/r.json", "report folder"),
        case("calib-missing", "--calib missing.npz", "not found"),
    ],
)
def test_bad_usage_is_refused(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str], extra: list[str], keyword: str
) -> None:
    assert_refused([model, "--no-latency", *extra], keyword, tmp_path, capsys)


def test_no_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_refused(["--target", "fp32"], "no model", tmp_path, capsys)


@pytest.mark.skipif(HAVE_CUDA, reason="onnxruntime has CUDAExecutionProvider here")
def test_cuda_backend_without_cuda_is_refused(tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_refused([model, "--target", "fp32", "--backend", "cuda", "--no-latency"], "cuda", tmp_path, capsys)


def test_existing_output_needs_force(tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "model.fp32.onnx"
    output.write_bytes(b"keep me")
    assert_refused([model, "--target", "fp32", "--no-latency"], "--force", tmp_path, capsys)
    assert output.read_bytes() == b"keep me"
    code, _, err = run_cli([model, "--target", "fp32", "--no-latency", "--force"], capsys)
    assert code == 0, err
    onnx.checker.check_model(onnx.load(str(output)))


@pytest.mark.parametrize(
    ("extra", "keyword"),
    [
        case("output-is-input", "-o {model}", "is the input"),
        case("output-is-input-dot", "-o {tmp}/./model.onnx", "is the input"),
        case("output-folder-missing", "-o {tmp}/nope/out.onnx", "folder does not exist: <tmp>/nope"),
        case("report-is-input", "--report {model}", "input"),
        case("report-is-output", "--report {output}", "report"),
        case("negative-seed", "--seed -1", "seed"),
        case("output-is-folder", "-o {folder} --force", "output"),
        case("dump-ir-is-file", "--dump-ir {model}", "dump-ir"),
        case("dump-ir-is-model-folder", "--dump-ir {tmp}", "holds the input or output model"),
    ],
)
def test_bad_paths_are_refused(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str], extra: list[str], keyword: str
) -> None:
    (tmp_path / "folder").mkdir()
    paths = {"model": model, "output": tmp_path / "model.fp32.onnx", "folder": tmp_path / "folder", "tmp": tmp_path}
    assert_refused([model, "--no-latency", *(a.format(**paths) for a in extra)], keyword, tmp_path, capsys)


def test_success_writes_equivalent_model_beside_input(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_hash = sha256(model)
    code, out, err = run_cli([model, "--target", "fp32", "--no-latency"], capsys)
    assert code == 0, err
    assert "| size |" in out and "SQNR" in out
    output = tmp_path / "model.fp32.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.fp32.onnx", "model.onnx"]  # no temp files
    assert sha256(model) == model_hash
    feeds = {"input": np.random.default_rng(7).standard_normal((5, 1, 8, 8)).astype(np.float32)}
    want = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert len(got) == len(want) == 1
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)


def test_external_data_inside_folder_is_accepted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    model = make_model(folder / "model.onnx", external=("weights.bin", 144))
    code, _, err = run_cli([model, "--no-latency"], capsys)  # the cwd is not the model's folder
    assert code == 0, err
    output = onnx.load(str(folder / "model.fp32.onnx"))
    assert not any(t.data_location == TensorProto.EXTERNAL for t in output.graph.initializer)


def test_output_has_default_permissions(tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli([model, "--no-latency"], capsys)[0] == 0
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "model.fp32.onnx").stat().st_mode & 0o777 == 0o666 & ~umask


def test_report_json(tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "r.json"
    code, _, err = run_cli([model, "--no-latency", "--report", report], capsys)
    assert code == 0, err
    data = json.loads(report.read_text())
    assert {"summary", "passes"} <= data.keys()
    assert "size" in data["summary"]
    assert data["passes"]
    for record in data["passes"]:
        assert {"name", "seconds", "modified"} <= record.keys()
        assert isinstance(record["name"], str) and isinstance(record["modified"], bool)
        assert record["seconds"] >= 0


def test_eval_with_labels_adds_accuracy(tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_npz(tmp_path / "eval.npz", n=40)
    code, out, err = run_cli([model, "--eval", data, "--calib", data, "--no-latency", "--verify"], capsys)
    assert code == 0, err
    assert "top-1 accuracy" in out
    assert "40 samples" in out


def test_no_fidelity_skips_the_accuracy_rows(tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_npz(tmp_path / "eval.npz", n=40)
    report = tmp_path / "r.json"
    code, out, err = run_cli([model, "--eval", data, "--no-latency", "--no-fidelity", "--report", report], capsys)
    assert code == 0, err
    summary = json.loads(report.read_text())["summary"]
    assert "size" in summary and not {"SQNR vs fp32", "top-1 accuracy"} & summary.keys()
    assert "evaluated on" not in out
    # The model's size before is its file's.
    assert summary["size"]["fp32"] == model.stat().st_size


def test_dump_ir(tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dump = tmp_path / "ir"
    code, _, err = run_cli([model, "--no-latency", "--dump-ir", dump], capsys)
    assert code == 0, err
    names = sorted(p.name for p in dump.iterdir())
    assert names[0] == "000_input.onnx" and len(names) > 1
    assert all(re.fullmatch(r"\d{3}_\w+\.onnx", name) for name in names), names
    assert [int(name[:3]) for name in names] == list(range(len(names)))
    for name in names:
        onnx.checker.check_model(onnx.load(str(dump / name)))


def test_help_shows_examples(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    assert "examples" in out and "--target" in out


@pytest.mark.skipif(not DEMO_MODEL.is_file(), reason="compressor/demo/demo.onnx not built yet")
def test_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["--demo", "--no-latency"], capsys)
    assert code == 0, err
    assert "| size |" in out
    assert (tmp_path / "compressor-demo" / "demo.fp32.onnx").is_file()
    code, _, err = run_cli(["--demo", "--no-latency"], capsys)  # the demo's own output is re-written
    assert code == 0, err


def test_failed_demo_leaves_no_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    code, _, err = run_cli(["--demo", "--target", "int8", "--calib", "bad.npz", "--no-latency"], capsys)
    assert code == 2 and "bad.npz" in err
    assert not (tmp_path / "compressor-demo").exists()


def test_keep_slow_int8_skips_the_latency_guard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for flags, guarded in (([], True), (["--keep-slow-int8"], False)):
        report = tmp_path / f"report{guarded}.json"
        argv = ["--demo", "--target", "int8", "--no-latency", "-o", tmp_path / f"d{guarded}.onnx", "--report", report]
        code, _, err = run_cli([*argv, *flags], capsys)
        assert code == 0, err
        record = json.loads(report.read_text())["passes"][-1]
        assert ("latency_guard" in record) is guarded


def test_console_script_prints_no_traceback(tmp_path: Path) -> None:
    """The installed script: bad input gives exit 2 and one line on stderr, never a traceback."""
    make_model(tmp_path / "model.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage")
    for argv in (["missing.onnx"], ["bad.onnx"], ["model.onnx", "--target", "int8"], ["model.onnx", "--nope"]):
        proc = subprocess.run([str(COMPRESS), *argv], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("compress: error:"), (argv, proc.stderr)
        assert proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "model.onnx"]


def test_nodes_left_in_float_are_grouped_by_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--demo", "--target", "int8", "--no-latency", "--keep-slow-int8", "-o", tmp_path / "d.onnx"]
    code, out, err = run_cli([*argv, "--keep-float", "node_Conv_88", "node_Conv_90"], capsys)
    assert code == 0, err
    assert "  node_Conv_88, node_Conv_90: kept in float by configuration\n" in out
