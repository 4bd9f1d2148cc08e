"""The torch bridge on every cached zoo model (trained weights), against onnxruntime within 1e-5.

Slow (the 224×224 models): run with ``pytest -m slow``. Models not cached are skipped; build them
with ``python -m benchmarks.zoo build``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from benchmarks import zoo
from compressor import runtime
from compressor.data import Dataset
from compressor.torch_bridge import TorchBridge


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.names())
def test_bridge_matches_onnxruntime_on_the_zoo(name: str) -> None:
    try:
        model = zoo.get(name, build=False)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        pytest.skip(f"{name} is not cached: {exc}")
    graph = ir.from_proto(onnx.load(model.onnx_path))
    x = Dataset(model.eval_path, runtime.input_specs(graph)).first_batch(4)
    (input_name,) = x
    expected = runtime.make_session(model.onnx_path).run(None, x)[0]
    with torch.no_grad():
        got = TorchBridge(graph)(torch.from_numpy(x[input_name]))[0].numpy()
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
