"""The third-party corpus (`benchmarks.thirdparty`): ONNX files others exported, through ``--target fp32``.

Each must come out valid (the full checker, and strict shape inference where the
input passes it) and compute what the original computes, within 1e-4 of the
output's scale, at the corpus's input sizes; the model's open sizes stay open.
``make test`` fetches the corpus first (``make corpus``).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from benchmarks.thirdparty import CORPUS, CorpusModel, feeds
from compressor import compress

RELATIVE = 1e-4
# The error is relative to the output's largest value, and at least to this: on random inputs a sigmoid
# head (the OCR detector's) can sit near 0 everywhere, where float32 rounding alone is 1e-7 absolute.
MIN_SCALE = 1e-2


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
        if np.issubdtype(want.dtype, np.floating):
            scale = float(np.abs(want).max()) if want.size else 0.0
            np.testing.assert_allclose(got, want, rtol=0, atol=RELATIVE * max(scale, MIN_SCALE))
        else:
            np.testing.assert_array_equal(got, want)
