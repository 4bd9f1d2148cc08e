"""The benchmark harness on the demo model: child process, measurements, SVD baseline, tables."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import DEMO_ONNX, run_onnx

from benchmarks import harness, peers, tables
from benchmarks.harness import Method, Row
from benchmarks.zoo import get
from compressor import ir as cir
from compressor import runtime
from compressor.data import Dataset
from compressor.metrics import compute_cost


@pytest.fixture(scope="module")
def demo():
    return get("demo", build=False)


@pytest.fixture(scope="module")
def fp32_row(demo) -> Row:
    # Two compiles, each in its own child: the wall time is their median.
    return harness.measure(demo, Method("ours fp32", "ours", "fp32", peers.ours_fp32), runs=3, repeats=2)


def test_ours_fp32_matches_the_original(fp32_row: Row) -> None:
    assert fp32_row.ok, fp32_row.note
    assert 1.0 <= fp32_row.size_ratio <= 1.05, "only the deployment trim (exporter metadata, shapes) goes"
    assert fp32_row.sqnr_db is not None and (math.isinf(fp32_row.sqnr_db) or fp32_row.sqnr_db >= 100.0)
    assert fp32_row.agreement == 1.0
    assert fp32_row.top1 == fp32_row.top1_fp32
    assert fp32_row.drop_pt == 0.0
    assert fp32_row.macs == fp32_row.macs_fp32 > 0
    assert set(fp32_row.latency_ms) == {1, 8}
    assert all(v > 0 for v in fp32_row.latency_ms.values())


def test_child_reports_its_own_wall_time_and_peak_rss(fp32_row: Row) -> None:
    assert fp32_row.wall_s is not None and fp32_row.wall_s > 0
    assert fp32_row.peak_rss_mb is not None and fp32_row.peak_rss_mb > 0
    assert fp32_row.base_rss_mb is not None and fp32_row.peak_rss_mb >= fp32_row.base_rss_mb


def test_not_applicable_becomes_the_note(demo) -> None:
    row = harness.measure(demo, Method("TP", "peer", "prune", peers.tp_uniform), runs=1)
    assert not row.ok
    assert row.note.startswith("not applicable: ") and "torch" in row.note


def test_recipe_rejects_local_functions() -> None:
    def local(model, out):  # pragma: no cover - never called
        return out

    with pytest.raises(ValueError, match="module-level"):
        Method("x", "peer", "int8", local)


def _demo_feeds(count: int = 64) -> dict[str, np.ndarray]:
    model = get("demo", build=False)
    specs = runtime.input_specs(cir.load_model(model.onnx_path))
    return Dataset(model.eval_path, specs).first_batch(count)


def test_svd_full_rank_reproduces_outputs() -> None:
    proto = onnx.load(str(DEMO_ONNX))
    factored, stats = peers.svd_lowrank(proto, 1.0, conv=True, skip_larger=False)
    assert stats.layers >= 5
    onnx.checker.check_model(factored)
    feeds = _demo_feeds()
    ref, out = run_onnx(proto, feeds)[0], run_onnx(factored, feeds)[0]
    assert float(np.max(np.abs(ref - out))) <= 1e-4 * float(np.max(np.abs(ref)))


def test_svd_low_rank_shrinks_the_factored_layers() -> None:
    proto = onnx.load(str(DEMO_ONNX))
    factored, stats = peers.svd_lowrank(proto, 0.25, conv=True)
    assert stats.layers >= 1
    assert stats.params_after < stats.params_before
    assert compute_cost(factored).params < compute_cost(proto).params
    assert run_onnx(factored, _demo_feeds(8))[0].shape == (8, 10)


def test_choose_fraction_hits_the_target() -> None:
    proto = onnx.load(str(DEMO_ONNX))
    fraction = peers.choose_fraction(proto, 0.2, conv=True)
    _, stats = peers.svd_lowrank(proto, fraction, conv=True)
    assert stats.params_after / stats.params_before == pytest.approx(0.2, abs=0.05)


def test_write_table_has_header_and_one_line_per_row(tmp_path: Path) -> None:
    rows = [
        Row("demo", "a", "peer", "int8", ok=True, top1_fp32=0.9, top1=0.89, agreement=0.98, sqnr_db=30.0),
        Row("demo", "b | c", "peer", "int8", note="failed: boom"),
    ]
    path = tables.write_table(rows, tmp_path / "t.md", "Title", ["model", "recipe", "drop", "sqnr", "note"])
    text = path.read_text()
    assert text.startswith("# Title\n")
    assert "| model | method | loss (pt) | SQNR dB | note |" in text
    assert "Machine: " in text and "onnxruntime" in text
    table = [ln for ln in text.splitlines() if ln.startswith("| demo ")]
    assert len(table) == 2
    assert "+1.00" in table[0] and "failed: boom" in table[1]


def test_plot_writes_pngs(tmp_path: Path, fp32_row: Row) -> None:
    written = tables.plot([fp32_row], tmp_path / "int8")
    assert [p.name for p in written] == ["int8-size.png", "int8-speed.png"]
    assert all(p.stat().st_size > 1000 for p in written)


def test_disk_size_counts_external_data(tmp_path: Path) -> None:
    proto = onnx.load(str(DEMO_ONNX))
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    assert harness.disk_size(path) == path.stat().st_size + (tmp_path / "m.data").stat().st_size


@pytest.mark.slow
def test_ort_defaults_quantizes_the_demo(demo) -> None:
    row = harness.measure(demo, Method("ORT", "peer", "int8", peers.ort_defaults), runs=3)
    assert row.ok, row.note
    assert row.size_ratio > 3.0
    assert row.agreement > 0.95
