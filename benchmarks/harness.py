"""Benchmark harness: run a compression method in a child process, then measure its output.

A `Method` names a module-level function ``fn(model, out_path) -> Path | None`` that
writes a compressed ONNX model. `measure` runs it in a fresh interpreter
(``python -m benchmarks.harness child ...``) so its wall time and peak RSS are its
own, then compares the result with the fp32 model in this process: accuracy or
agreement, logits SQNR, size on disk, MACs, params and A/B-interleaved latency.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort

from compressor import ir as cir
from compressor import runtime
from compressor.data import Dataset
from compressor.metrics import compute_cost, interleaved_latency, one_at_a_time_latency, sqnr_db

REPO_ROOT = Path(__file__).resolve().parent.parent
THREADS = 2
EVAL_BATCH = 64
CONFIDENT_MARGIN = 0.1
CHILD_TIMEOUT_S = 3600
LATENCY_BUDGET_MS = 1000.0  # tiny models get more runs than ``runs``, up to MAX_RUNS, for a stable median
MAX_RUNS = 500
MEMORY_SHARE = 0.75  # a child above this share of the memory available at its start is killed

if TYPE_CHECKING:
    from benchmarks.zoo import ZooModel


class NotApplicable(Exception):
    """Raised by a recipe that does not apply to a model; the message says why."""


@dataclass(frozen=True)
class Method:
    """One row label: a compression method and the function that produces its ONNX model."""

    name: str
    family: str  # "ours" or "peer"
    kind: str  # "int8", "prune", "lowrank" or "fp32"
    fn: Callable[[ZooModel, Path], Path | None]
    heavy: bool = False  # slow or memory-hungry on 224×224 models: run there only when asked
    latency_batches: tuple[int, ...] = (1, 8)  # batch sizes whose latency the row measures

    def __post_init__(self) -> None:
        if "<" in self.fn.__qualname__:
            raise ValueError(f"recipe {self.name!r}: fn must be a module-level function, not {self.fn.__qualname__}")

    @property
    def fn_spec(self) -> str:
        """``module:function``, importable by the child process."""
        return f"{self.fn.__module__}:{self.fn.__qualname__}"


@dataclass
class Row:
    """One measured (model, recipe) pair. Ratios are fp32 / compressed unless named otherwise."""

    model: str
    recipe: str
    family: str
    kind: str
    note: str = ""
    ok: bool = False
    wall_s: float | None = None
    peak_rss_mb: float | None = None
    base_rss_mb: float | None = None
    calib_samples: int | None = None
    eval_samples: int | None = None
    top1_fp32: float | None = None
    top1: float | None = None
    agreement: float | None = None
    agreement_confident: float | None = None
    confident_samples: int | None = None
    sqnr_db: float | None = None
    size_bytes: int | None = None
    size_fp32_bytes: int | None = None
    macs: int | None = None
    macs_fp32: int | None = None
    params: int | None = None
    params_fp32: int | None = None
    latency_ms: dict[int, float] = field(default_factory=dict)
    latency_fp32_ms: dict[int, float] = field(default_factory=dict)
    latency_spinning_ms: float | None = None  # batch 1, onnxruntime's default options (spinning on)
    latency_fp32_spinning_ms: float | None = None

    @property
    def size_ratio(self) -> float | None:
        """fp32 size / compressed size (× smaller)."""
        return _ratio(self.size_fp32_bytes, self.size_bytes)

    @property
    def macs_removed(self) -> float | None:
        """Fraction of fp32 MACs removed."""
        return None if not self.macs_fp32 or self.macs is None else 1.0 - self.macs / self.macs_fp32

    @property
    def params_fraction(self) -> float | None:
        """Compressed params / fp32 params."""
        return _ratio(self.params, self.params_fp32)

    def speedup(self, batch: int) -> float | None:
        """fp32 latency / compressed latency at ``batch``."""
        return _ratio(self.latency_fp32_ms.get(batch), self.latency_ms.get(batch))

    @property
    def speedup_spinning(self) -> float | None:
        """fp32 / compressed latency at batch 1 with onnxruntime's default options (spinning on)."""
        return _ratio(self.latency_fp32_spinning_ms, self.latency_spinning_ms)

    @property
    def drop_pt(self) -> float | None:
        """Top-1 loss in points with true labels, else disagreement with fp32 in points."""
        if self.top1 is not None and self.top1_fp32 is not None:
            return 100.0 * (self.top1_fp32 - self.top1)
        return None if self.agreement is None else 100.0 * (1.0 - self.agreement)


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


# ---------------------------------------------------------------- child process


def run_child(fn_spec: str, model_file: Path, out_path: Path, result_file: Path) -> None:
    """Child entry: import and run the recipe, write wall time, peak RSS and outcome as JSON."""
    model = decode_model(json.loads(model_file.read_text()))
    module_name, _, qualname = fn_spec.partition(":")
    fn = getattr(importlib.import_module(module_name), qualname)
    base_rss = _peak_rss_mb()
    result: dict[str, object] = {"status": "ok", "base_rss_mb": base_rss}
    start = time.perf_counter()
    try:
        written = fn(model, out_path)
        result["path"] = str(written or out_path)
    except NotApplicable as exc:
        result.update(status="not_applicable", error=str(exc))
    except Exception as exc:  # noqa: BLE001 - a failing peer is a result, recorded in its row
        traceback.print_exc()
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        where = f" (in {Path(frame.filename).parent.name}/{Path(frame.filename).name}:{frame.name})"
        result.update(status="error", error=f"{type(exc).__name__}: {_first_line(str(exc))}{where}")
    result["wall_s"] = time.perf_counter() - start
    result["peak_rss_mb"] = _peak_rss_mb()
    result_file.write_text(json.dumps(result))


def encode_model(model: ZooModel) -> dict[str, object]:
    """JSON-able fields of a `ZooModel` (paths tagged), for the child process."""
    encoded: dict[str, object] = {}
    for f in fields(model):
        value = getattr(model, f.name)
        encoded[f.name] = {"path": str(value)} if isinstance(value, Path) else value
    return encoded


def decode_model(encoded: dict[str, object]) -> ZooModel:
    """The child's view of the model: same attributes, without importing the zoo (and torch)."""
    decoded = {k: Path(v["path"]) if isinstance(v, dict) else v for k, v in encoded.items()}
    if isinstance(decoded.get("input_shape"), list):
        decoded["input_shape"] = tuple(decoded["input_shape"])
    return SimpleNamespace(**decoded)  # type: ignore[return-value]


def _peak_rss_mb() -> float:
    """This process's peak resident set, in MB.

    Linux's ``ru_maxrss`` survives exec: a child started by `subprocess` (vfork) reports
    at least the parent's RSS. ``VmHWM`` in /proc/self/status belongs to the new address
    space alone, so it is read first; ``ru_maxrss`` is the fallback elsewhere.
    """
    peak = _meminfo_mb("VmHWM", "/proc/self/status")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _first_line(text: str, limit: int = 200) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _meminfo_mb(key: str, path: str = "/proc/meminfo") -> float | None:
    """A kB field of a /proc status file, in MB (None where unreadable)."""
    try:
        with open(path) as f:
            line = next(ln for ln in f if ln.startswith(f"{key}:"))
        return int(line.split()[1]) / 1024.0
    except (OSError, StopIteration, ValueError):
        return None


def _spawn(recipe: Method, model: ZooModel, work: Path, timeout_s: float) -> dict[str, object]:
    """Run the child; kill it past ``timeout_s`` or when its RSS nears the machine's available memory."""
    model_file, out_path, result_file, log = work / "model.json", work / "out.onnx", work / "result.json", work / "log"
    model_file.write_text(json.dumps(encode_model(model)))
    cmd = [sys.executable, "-m", "benchmarks.harness", "child", recipe.fn_spec, *map(str, (model_file, out_path))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    limit_mb = MEMORY_SHARE * (_meminfo_mb("MemAvailable") or float("inf"))
    start, killed = time.perf_counter(), ""
    with log.open("w") as out:
        proc = subprocess.Popen([*cmd, str(result_file)], cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            rss = _meminfo_mb("VmRSS", f"/proc/{proc.pid}/status") or 0.0
            if rss > limit_mb:
                killed = f"killed at {rss:.0f} MB RSS (limit: {MEMORY_SHARE:.0%} of the memory available at start)"
            elif time.perf_counter() - start > timeout_s:
                killed = f"timed out after {timeout_s:.0f} s"
            if killed:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.2)
    if killed:
        return {"status": "error", "error": killed, "wall_s": time.perf_counter() - start}
    if not result_file.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        return {"status": "error", "error": f"child exited {proc.returncode}: {_first_line(tail[0])}"}
    return json.loads(result_file.read_text())


# ---------------------------------------------------------------- measurement


def measure(
    model: ZooModel,
    recipe: Method,
    *,
    runs: int = 20,
    eval_limit: int | None = None,
    timeout_s: float = CHILD_TIMEOUT_S,
    repeats: int = 1,
) -> Row:
    """Run ``recipe`` on ``model`` in a child process and measure its output against fp32.

    With ``repeats`` > 1 the recipe runs that many times, each in a fresh child: the row's
    wall time is their median and its peak RSS their largest (the last child's output is measured).
    """
    row = Row(model.name, recipe.name, recipe.family, recipe.kind)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        outcomes = []
        for attempt in range(repeats):  # each in its own folder: a recipe may refuse to overwrite its output
            work = Path(tmp) / f"run{attempt}"
            work.mkdir()
            outcomes.append(_spawn(recipe, model, work, timeout_s))
        outcome = outcomes[-1]
        if all(o["status"] == "ok" for o in outcomes):
            row.wall_s = statistics.median(float(o["wall_s"]) for o in outcomes)
            row.peak_rss_mb = max(float(o["peak_rss_mb"]) for o in outcomes)
        else:
            outcome = next(o for o in outcomes if o["status"] != "ok")
            row.wall_s, row.peak_rss_mb = outcome.get("wall_s"), outcome.get("peak_rss_mb")
        row.base_rss_mb = outcome.get("base_rss_mb")
        if outcome["status"] != "ok":
            prefix = "not applicable: " if outcome["status"] == "not_applicable" else "failed: "
            row.note = prefix + str(outcome["error"])
            return row
        try:
            _measure_output(row, model, Path(str(outcome["path"])), runs, eval_limit, recipe.latency_batches)
            row.ok = True
        except Exception as exc:  # noqa: BLE001 - e.g. onnxruntime refusing the peer's model
            row.note = f"measuring failed: {type(exc).__name__}: {_first_line(str(exc))}"
    return row


def _measure_output(
    row: Row, model: ZooModel, path: Path, runs: int, eval_limit: int | None, batches: tuple[int, ...] = (1, 8)
) -> None:
    options = runtime.session_options(threads=THREADS, spinning=False)
    fp32 = ort.InferenceSession(str(model.onnx_path), options, providers=["CPUExecutionProvider"])
    test = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    specs = runtime.input_specs(cir.load_model(model.onnx_path))
    row.calib_samples = Dataset(model.calib_path, specs).num_samples
    _fidelity(row, model, fp32, test, Dataset(model.eval_path, specs), eval_limit)
    row.size_bytes, row.size_fp32_bytes = disk_size(path), disk_size(model.onnx_path)
    before, after = compute_cost(onnx.load(str(model.onnx_path))), compute_cost(onnx.load(str(path)))
    row.macs, row.macs_fp32, row.params, row.params_fp32 = after.macs, before.macs, after.params, before.params
    feeds = Dataset(model.eval_path, specs).first_batch(max(batches))
    for batch in batches:
        sliced = {k: v[:batch] for k, v in feeds.items()}
        if next(iter(sliced.values())).shape[0] < batch:
            continue
        ref, new = interleaved_latency([fp32, test], sliced, runs=_runs_for([fp32, test], sliced, runs))
        row.latency_fp32_ms[batch], row.latency_ms[batch] = ref.median_ms, new.median_ms
    single = {k: v[:1] for k, v in feeds.items()}
    spinning_runs = _runs_for([fp32, test], single, runs)
    del fp32, test  # their threads must not share the cores with the spinning sessions below
    spinning = runtime.session_options(threads=THREADS, spinning=True)
    factories = [
        functools.partial(ort.InferenceSession, str(p), spinning, providers=["CPUExecutionProvider"])
        for p in (model.onnx_path, path)
    ]
    ref, new = one_at_a_time_latency(factories, single, runs=spinning_runs)
    row.latency_fp32_spinning_ms, row.latency_spinning_ms = ref.median_ms, new.median_ms


def _runs_for(sessions: list[ort.InferenceSession], feeds: dict[str, np.ndarray], runs: int) -> int:
    """At least ``runs``; more for fast models, so the timing lasts about `LATENCY_BUDGET_MS`."""
    estimate = sum(latency.median_ms for latency in interleaved_latency(sessions, feeds, runs=5, warmup=1))
    return int(np.clip(LATENCY_BUDGET_MS / estimate, runs, max(runs, MAX_RUNS)))


def _fidelity(
    row: Row, model: ZooModel, fp32: ort.InferenceSession, test: ort.InferenceSession, data: Dataset,
    limit: int | None,
) -> None:  # fmt: skip
    refs, outs, labels = [], [], []
    for batch in data.batches(batch_size=EVAL_BATCH, limit=limit):
        refs.append(runtime.run(fp32, batch.feeds)[0])
        outs.append(runtime.run(test, batch.feeds)[0])
        if batch.labels is not None:
            labels.append(batch.labels)
    ref, out = np.concatenate(refs), np.concatenate(outs)
    ref2, out2 = ref.reshape(len(ref), -1), out.reshape(len(out), -1)
    row.eval_samples = len(ref)
    match = np.argmax(ref2, 1) == np.argmax(out2, 1)
    row.agreement = float(match.mean())
    row.sqnr_db = float(sqnr_db(ref, out))
    if model.true_labels and labels:
        truth = np.concatenate(labels)
        row.top1_fp32 = float((np.argmax(ref2, 1) == truth).mean())
        row.top1 = float((np.argmax(out2, 1) == truth).mean())
    with np.load(model.eval_path) as npz:
        margin = npz["margin"][: len(ref)] if "margin" in npz.files else None
    if margin is not None:
        confident = margin >= CONFIDENT_MARGIN
        row.confident_samples = int(confident.sum())
        row.agreement_confident = float(match[confident].mean()) if confident.any() else None


def disk_size(path: Path) -> int:
    """Bytes on disk of an ONNX file plus every external-data file it references."""
    proto = onnx.load(str(path), load_external_data=False)
    files = {path}
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next(e.value for e in tensor.external_data if e.key == "location")
            files.add(path.parent / location)
    return sum(f.stat().st_size for f in files)


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.harness child FN MODEL_JSON OUT RESULT``: the child-process entry."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.harness")
    sub = parser.add_subparsers(dest="command", required=True)
    child = sub.add_parser("child", help="run one recipe (used by measure())")
    for name in ("fn", "model", "out", "result"):
        child.add_argument(name)
    args = parser.parse_args(argv)
    # Run through the importable module, not __main__, so recipes raise the same NotApplicable class.
    child_main = importlib.import_module("benchmarks.harness").run_child
    child_main(args.fn, Path(args.model), Path(args.out), Path(args.result))


if __name__ == "__main__":
    main()
