"""Sessions built through a temporary file (large models) against sessions built from bytes."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from compressor import runtime
from tests.conftest import conv_bn_model


@pytest.mark.parametrize("as_ir", [False, True])
def test_file_session_matches_bytes_and_leaves_nothing(
    as_ir: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proto = conv_bn_model()
    before = proto.SerializeToString()
    expected = ort.InferenceSession(before, providers=["CPUExecutionProvider"])
    feeds = {"input": np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    monkeypatch.setattr(runtime, "FILE_SESSION_MIN_BYTES", 0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    session = runtime.make_session(ir.serde.deserialize_model(proto) if as_ir else proto)

    np.testing.assert_array_equal(runtime.run(session, feeds)[0], expected.run(None, feeds)[0])
    assert proto.SerializeToString() == before  # the model handed in is not modified
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone once the session exists
    assert session._model_bytes is None  # the wrapper's copy is released


def test_small_model_goes_as_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    written: list[str] = []
    monkeypatch.setattr(ir, "save", lambda *args, **kwargs: written.append(str(args[1])))
    session = runtime.make_session(conv_bn_model())  # a few KB, far under FILE_SESSION_MIN_BYTES
    assert written == []
    assert [o.name for o in session.get_outputs()] == ["logits"]


def test_unwritable_temporary_folder_falls_back_to_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "FILE_SESSION_MIN_BYTES", 0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    session = runtime.make_session(conv_bn_model())
    assert [o.name for o in session.get_outputs()] == ["logits"]
