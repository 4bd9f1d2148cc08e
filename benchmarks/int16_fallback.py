"""The int16 fallback of int8 on EfficientNet-Lite0, beside the float fallback: a section of results/int16.md.

    .venv/bin/python -m benchmarks.int16 --models demo efficientnet_lite0   # the section comes with any run

EfficientNet-Lite0 is the fragile case (DESIGN.md §9), on the rounding issue's conditions: its first 64
calibration crops and first 256 evaluation crops, fidelity judged by logits SQNR and by top-1 agreement
on the confident crops (fp32 top-1/top-2 margin >= 0.1), all-crop agreement beside it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

import compressor
from benchmarks.int16 import ROOT, disk_bytes, latencies, options, predict
from compressor import runtime
from compressor.metrics import sqnr_db

MODEL = "efficientnet_lite0"
CALIB_CROPS, EVAL_CROPS = 64, 256
ROWS = (
    ("int8, float fallback (defaults)", {"target": "int8"}),
    ("int8, --fallback int16", {"target": "int8", "int8": {"fallback": "int16"}}),
    ("int8, --fallback int16 --min-sqnr 25", {"target": "int8", "int8": {"fallback": "int16", "min_sqnr_db": 25.0}}),
    ("int16", {"target": "int16"}),
)
HEADER = ("recipe", "logits SQNR dB", "confident agreement", "all-crop agreement", "speed-up b1", "× smaller",
          "int16 layers", "float compute layers", "nodes kept float (report)", "compile s")  # fmt: skip


def float_compute(model: onnx.ModelProto) -> list[str]:
    """Conv/Gemm/MatMul nodes that compute in float: neither a fused int8 operator nor reading int16 weights."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}
    found = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul", "ConvTranspose"):
            continue
        weight = producers.get(node.input[1])
        stored = inits.get(weight.input[0]) if weight is not None and weight.op_type == "DequantizeLinear" else None
        if stored is None or stored.data_type != TensorProto.INT16:
            found.append(node.name or node.output[0])
    return found


def int16_layers(model: onnx.ModelProto) -> int:
    return sum(1 for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")) - len(float_compute(model))


def section(folder: Path) -> list[str]:
    """The markdown lines of the fallback table (or one line saying why it is missing)."""
    cache = ROOT / "cache" / MODEL
    if not (cache / "model.onnx").is_file():
        return [f"EfficientNet-Lite0 is not cached ({cache}): build it with `python -m benchmarks.zoo build {MODEL}`."]
    calib_data, eval_data = np.load(cache / "calib.npz"), np.load(cache / "eval.npz")
    calib = folder / "efficientnet-calib.npz"
    np.savez(calib, x=calib_data["x"][:CALIB_CROPS])
    x, margin = eval_data["x"][:EVAL_CROPS], eval_data["margin"][:EVAL_CROPS]
    built = []
    for label, settings in ROWS:
        start = time.perf_counter()
        result = compressor.compress(cache / "model.onnx", calib=calib, measure_latency=False, measure_fidelity=False,
                                     progress=False, **settings)  # fmt: skip
        seconds = time.perf_counter() - start
        size = disk_bytes(result.save(folder / f"efficientnet-{len(built)}.onnx"))
        built.append((label, result, seconds, size))
    sessions = [runtime.make_session(cache / "model.onnx", options=options())]
    sessions += [runtime.make_session(result.lowered, options=options()) for _, result, _, _ in built]
    name = sessions[0].get_inputs()[0].name
    outputs = [predict(session, name, x) for session in sessions]
    times = latencies(sessions, name, x)
    fp32_bytes = disk_bytes([cache / "model.onnx"])
    confident = margin >= 0.1
    lines = [
        "## int16 as int8's fallback: EfficientNet-Lite0",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    for (label, result, seconds, size), logits, latency in zip(built, outputs[1:], times[1:], strict=True):
        agree = np.argmax(logits, 1) == np.argmax(outputs[0], 1)
        cells = [
            label, f"{sqnr_db(outputs[0], logits):.1f}", f"{agree[confident].mean():.3f}", f"{agree.mean():.3f}",
            f"{times[0] / latency:.2f}×", f"{fp32_bytes / size:.2f}×", str(int16_layers(result.lowered)),
            str(len(float_compute(result.lowered))), str(len(result.report.kept_float)), f"{seconds:.1f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Calibration: the first {CALIB_CROPS} calibration crops; evaluation: the first {EVAL_CROPS} crops "
        f"({int(confident.sum())} confident). *float compute layers*: Conv/Gemm/MatMul that neither run as a fused "
        "int8 operator nor read int16 weights (0 = every layer integer). The float fallback's row includes the "
        "latency guard, which puts int8 islands that run slower than float back in float; the int16 fallback skips "
        "the guard, since nothing is to be float. onnxruntime emulates int16 in float, so the int16 layers cost "
        "speed here; on a 16-bit integer target they would not.",
        "",
    ]
    return lines
