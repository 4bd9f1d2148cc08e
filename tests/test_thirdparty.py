"""The third-party corpus (`benchmarks.thirdparty`): ONNX files others exported, through ``--target fp32``.

Each must come out valid (the full checker, and strict shape inference where the
input passes it) and compute what the original computes, within 1e-4 of the
output's scale, at the corpus's input sizes; the model's open sizes stay open.
``make test`` fetches the corpus first (``make corpus``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from benchmarks.thirdparty import CORPUS, CorpusModel, feeds, int8_pair, relative_error
from compressor import compress

RELATIVE = 1e-4


def outputs(model: str | onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def passes_strict_inference(model: onnx.ModelProto) -> bool:
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError):
        return False
    return True


def open_axes(model: onnx.ModelProto) -> dict[str, list[int]]:
    initializers = {t.name for t in model.graph.initializer}
    return {
        i.name: [a for a, d in enumerate(i.type.tensor_type.shape.dim) if d.dim_value <= 0]
        for i in model.graph.input
        if i.name not in initializers
    }


@pytest.mark.parametrize("model", CORPUS, ids=[m.name for m in CORPUS])
def test_fp32_round_trip(model: CorpusModel) -> None:
    if not model.path.is_file():
        pytest.fail(f"{model.path} is not cached; run `make corpus` (python -m benchmarks.thirdparty fetch)")
    original = onnx.load(model.path)
    result = compress(model.path, "fp32", input_shapes=model.shapes, measure_latency=False, progress=False)
    onnx.checker.check_model(result.lowered, full_check=True)
    if passes_strict_inference(original):
        assert passes_strict_inference(result.lowered)
    assert open_axes(result.lowered) == open_axes(original), "open input sizes stay open"
    inputs = feeds(model)
    expected, actual = outputs(str(model.path), inputs), outputs(result.lowered, inputs)
    assert len(actual) == len(expected)
    for want, got in zip(expected, actual, strict=True):
        assert want.shape == got.shape and want.dtype == got.dtype
        assert relative_error(want, got) <= RELATIVE


INT8 = [m for m in CORPUS if not m.no_int8]
# Known shortfalls, kept visible: issue 19 stays open until these pass. Not strict: on some machines (the
# onnxruntime build, the CPU) magika's margin falls on our side; the 2026-12-04 machine passed it.
BEHIND_QUANTIZE_STATIC = {"magika_v3_3": "0.9 dB below quantize_static's SQNR on random bytes (54.7 vs 55.6 dB)"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "model",
    [
        pytest.param(m, marks=pytest.mark.xfail(reason=BEHIND_QUANTIZE_STATIC[m.name], strict=False))
        if m.name in BEHIND_QUANTIZE_STATIC
        else m
        for m in INT8
    ],
    ids=[m.name for m in INT8],
)
def test_int8_is_valid_and_at_least_as_close_as_quantize_static(model: CorpusModel, tmp_path: Path) -> None:
    pair = int8_pair(model, tmp_path)
    onnx.checker.check_model(onnx.load(pair.ours_path), full_check=True)
    assert pair.ours_sqnr_db > 20.0
    if pair.ort_sqnr_db is not None:  # where quantize_static fails, ours still has to be valid
        assert pair.ours_sqnr_db >= pair.ort_sqnr_db, f"ours {pair.ours_sqnr_db:.1f} dB, ORT {pair.ort_sqnr_db:.1f} dB"


# SQNR of int16 vs fp32 on random inputs; deep OCR/detection nets with heavy-tailed activations sit lowest
# (ppocr_v4_det: 34.6 dB). The random inputs come from the calibration's distribution, so no headroom: each
# bit of it costs ppocr_v4_det about 14 dB, compounded over its ~200 layers (20.7 dB at the default 1 bit).
INT16_MIN_SQNR_DB = 30.0


@pytest.mark.parametrize("model", INT8, ids=[m.name for m in INT8])
def test_int16_is_valid_and_close_to_fp32(model: CorpusModel, tmp_path: Path) -> None:
    from benchmarks.thirdparty import calibration_file
    from compressor.metrics import sqnr_db

    result = compress(model.path, "int16", calib=calibration_file(model, tmp_path), int16={"headroom_bits": 0},
                      measure_latency=False, measure_fidelity=False, progress=False)  # fmt: skip
    onnx.checker.check_model(result.lowered, full_check=True)
    x = feeds(model, seed=1)
    expected, got = outputs(str(model.path), x), outputs(result.lowered, x)
    for want, have in zip(expected, got, strict=True):
        assert want.shape == have.shape and want.dtype == have.dtype
        if np.issubdtype(want.dtype, np.floating):
            assert sqnr_db(want.astype(np.float64), have.astype(np.float64)) >= INT16_MIN_SQNR_DB
