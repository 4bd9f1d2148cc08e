"""fp32 vs our int8 on onnxruntime's CUDA provider, side by side. Needs onnxruntime-gpu and a GPU; CI never runs it.

    python -m benchmarks.gpu --model resnet18_224=model.onnx:calib.npz [--model ...] [--out results/gpu.md]

For each model, ``compress(..., target="int8", backend="cuda")`` builds the QDQ
form that the CUDA provider runs, once with the latency guard (float wherever
int8 measured slower) and once keeping all int8. Each is timed against fp32 on
the GPU with inputs and outputs bound on the device (I/O binding: no host copies
are timed), interleaved, at batch 1 and 8. Fidelity is the int8 logits against
fp32 on the calibration samples: SQNR and top-1 agreement.

On a machine without the zoo cache, pass the files directly; the 224-pixel
models and a few calibration crops fit in a GPU machine's upload.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from datetime import date
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from benchmarks.readme import HEADLINE_END, HEADLINE_START
from compressor import compress, metrics, runtime

RUNS = 200
WARMUP = 10
COLUMNS = (
    "model",
    "variant",
    "fp32 b1 (ms)",
    "b1 (ms)",
    "speed-up b1",
    "speed-up b8",
    "× smaller",
    "SQNR (dB)",
    "agreement",
    "compile (s)",
)
VARIANTS = {"default (latency guard)": True, "int8 kept (--keep-slow-int8)": False}


def device_latency(sessions: list[ort.InferenceSession], x: np.ndarray, runs: int = RUNS) -> list[float]:
    """Median milliseconds per run of each session, inputs and outputs on the GPU, runs interleaved."""
    bindings = []
    for session in sessions:
        binding = session.io_binding()
        binding.bind_ortvalue_input(session.get_inputs()[0].name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
        for output in session.get_outputs():
            binding.bind_output(output.name, "cuda")
        bindings.append(binding)
    samples: list[list[float]] = [[] for _ in sessions]
    for index in range(WARMUP + runs):
        for session, binding, bucket in zip(sessions, bindings, samples, strict=True):
            start = time.perf_counter()
            session.run_with_iobinding(binding)
            if index >= WARMUP:
                bucket.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(bucket) for bucket in samples]


def measure(name: str, model_path: Path, calib_path: Path) -> list[dict[str, str]]:
    providers = ("CUDAExecutionProvider", "CPUExecutionProvider")
    fp32 = onnx.load(model_path)
    x = np.load(calib_path)["x"].astype(np.float32)
    rows = []
    for variant, guard in VARIANTS.items():
        started = time.perf_counter()
        result = compress(
            model_path, target="int8", calib=calib_path, backend="cuda", measure_latency=False, latency_guard=guard
        )
        compile_s = time.perf_counter() - started
        options = runtime.session_options(spinning=False)
        sessions = [runtime.make_session(model, providers, options) for model in (fp32, result.lowered)]
        assert all(s.get_providers()[0] == "CUDAExecutionProvider" for s in sessions), "CUDA provider not in use"
        reference, quantized = (runtime.run(s, {s.get_inputs()[0].name: x})[0] for s in sessions)
        b1 = device_latency(sessions, x[:1])
        b8 = device_latency(sessions, np.resize(x, (8, *x.shape[1:])).astype(np.float32))
        size = metrics.model_size_bytes(fp32) / metrics.model_size_bytes(result.lowered)
        rows.append(
            {
                "model": name,
                "variant": variant,
                "fp32 b1 (ms)": f"{b1[0]:.3f}",
                "b1 (ms)": f"{b1[1]:.3f}",
                "speed-up b1": f"{b1[0] / b1[1]:.2f}×",
                "speed-up b8": f"{b8[0] / b8[1]:.2f}×",
                "× smaller": f"{size:.2f}×",
                "SQNR (dB)": f"{metrics.sqnr_db(reference, quantized):.1f}",
                "agreement": f"{100 * metrics.top1_agreement(reference, quantized):.1f}%",
                "compile (s)": f"{compile_s:.1f}",
            }
        )
        print(rows[-1], flush=True)
    return rows


def gpu_name() -> str:
    try:
        query = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]
        return subprocess.run(query, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown GPU"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="NAME=MODEL.onnx:CALIB.npz")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu.md"))
    args = parser.parse_args(argv)
    rows = []
    for spec in args.model:
        name, paths = spec.split("=", 1)
        model_path, calib_path = paths.split(":", 1)
        rows += measure(name, Path(model_path), Path(calib_path))
    lines = [
        "# int8 on onnxruntime CUDA",
        "",
        HEADLINE_START,
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(row[c] for c in COLUMNS) + " |" for row in rows),
        HEADLINE_END,
        "",
        f"Machine: {gpu_name()}; onnxruntime {ort.__version__}, CUDAExecutionProvider; inputs and outputs bound "
        f"on the device; medians of {RUNS} interleaved runs; {date.today().isoformat()}.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
