"""Backends: lowering to an onnx.ModelProto, sessions, runs, latency and the CUDA availability check."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import conv_bn_model
from onnx import TensorProto, helper, numpy_helper

import compressor.ir as cir
from compressor import runtime
from compressor.backends import BACKENDS, Backend, OnnxruntimeCPU, OnnxruntimeCUDA, get_backend
from compressor.errors import BackendUnavailableError, CompressorError, ModelError, UsageError
from compressor.metrics import Latency

DEMO = Path(__file__).resolve().parent.parent / "compressor" / "demo" / "demo.onnx"
HAVE_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def small_model() -> onnx.ModelProto:
    """X[N,3,8,8] -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> Y[N,5]."""
    rng = np.random.default_rng(0)
    weights = {
        "W": rng.standard_normal((4, 3, 3, 3)),
        "B": rng.standard_normal(4),
        "G": rng.standard_normal((5, 4)),
        "C": rng.standard_normal(5),
    }
    nodes = [
        helper.make_node("Conv", ["X", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "G", "C"], ["Y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(a.astype(np.float32), name) for name, a in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def model() -> ir.Model:
    return ir.serde.deserialize_model(small_model())


@pytest.fixture
def feeds() -> dict[str, np.ndarray]:
    return {"X": np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)}


def direct_run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def fake_providers(monkeypatch: pytest.MonkeyPatch, providers: list[str]) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(providers))


# ---------------------------------------------------------------- registry


def test_get_backend_returns_registered_backends() -> None:
    cpu = get_backend("cpu", threads=3)
    assert isinstance(cpu, OnnxruntimeCPU) and isinstance(cpu, Backend)
    assert (cpu.name, cpu.threads, cpu.providers) == ("cpu", 3, ("CPUExecutionProvider",))
    assert get_backend("cpu").threads == 2
    assert set(BACKENDS) == {"cpu", "cuda"}


@pytest.mark.parametrize("name", ["nope", "", "CPU", "onnxruntime"])
def test_unknown_backend_is_a_usage_error(name: str) -> None:
    with pytest.raises(UsageError, match="cpu, cuda") as info:
        get_backend(name)
    assert repr(name) in str(info.value)


# ---------------------------------------------------------------- CPU


def test_cpu_lower_gives_valid_proto_and_leaves_ir_alone(model: ir.Model) -> None:
    before = cir.to_proto(model).SerializeToString()
    lowered = get_backend("cpu").lower(model)
    assert isinstance(lowered, onnx.ModelProto)
    onnx.checker.check_model(lowered, full_check=True)
    assert [n.op_type for n in lowered.graph.node] == ["Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm"]
    assert cir.to_proto(model).SerializeToString() == before, "lowering modified the IR model"


def test_cpu_lower_inlines_external_weights(tmp_path: Path, feeds: dict[str, np.ndarray]) -> None:
    path = tmp_path / "ext.onnx"
    onnx.save_model(small_model(), str(path), save_as_external_data=True, size_threshold=0, location="w.bin")
    lowered = get_backend("cpu").lower(cir.load_model(path))
    assert all(t.data_location != TensorProto.EXTERNAL for t in lowered.graph.initializer)
    np.testing.assert_array_equal(direct_run(lowered, feeds)[0], direct_run(small_model(), feeds)[0])


def test_cpu_session_and_run_match_onnxruntime(model: ir.Model, feeds: dict[str, np.ndarray]) -> None:
    backend = get_backend("cpu", threads=1)
    expected = direct_run(small_model(), feeds)
    for source in (model, backend.lower(model)):
        session = backend.session(source)
        assert session.get_providers() == ["CPUExecutionProvider"]
        assert session.get_session_options().intra_op_num_threads == 1
        outputs = backend.run(session, {**feeds, "unused": np.zeros(1, np.float32)})  # extra feeds ignored
        assert len(outputs) == 1 and outputs[0].shape == (3, 5)
        np.testing.assert_allclose(outputs[0], expected[0], rtol=1e-5, atol=1e-6)


def test_cpu_latency_returns_one_positive_latency_per_model(model: ir.Model, feeds: dict[str, np.ndarray]) -> None:
    backend = get_backend("cpu", threads=1)
    m1, m2 = model, backend.lower(model)
    latencies = backend.latency([m1, m2], feeds, runs=5)
    assert len(latencies) == 2
    for latency in latencies:
        assert isinstance(latency, Latency)
        assert latency.runs == 5
        assert 0 < latency.median_ms < 10_000
        assert latency.p10_ms <= latency.median_ms <= latency.p90_ms


# ---------------------------------------------------------------- CUDA


@pytest.mark.parametrize("make", [lambda: OnnxruntimeCUDA(), lambda: get_backend("cuda")], ids=["class", "registry"])
def test_cuda_without_provider_raises_clear_error(make: Callable[[], Backend], monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs everywhere: the GPU machine's provider list is faked away."""
    fake_providers(monkeypatch, ["CPUExecutionProvider"])
    with pytest.raises(BackendUnavailableError) as info:
        make()
    message = str(info.value)
    assert isinstance(info.value, CompressorError)
    assert "cuda" in message.lower() and "onnxruntime-gpu" in message
    assert "\n" not in message


@pytest.mark.skipif(HAVE_CUDA, reason="CUDAExecutionProvider is available here")
def test_cuda_unavailable_on_this_machine() -> None:
    with pytest.raises(BackendUnavailableError, match="onnxruntime-gpu") as info:
        get_backend("cuda")
    assert "cuda" in str(info.value).lower()


def test_cuda_provider_order(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_providers(monkeypatch, ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    assert OnnxruntimeCUDA().providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert OnnxruntimeCUDA(tensorrt=True).providers == (
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    )


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA, reason="needs onnxruntime-gpu with CUDAExecutionProvider")
def test_cuda_matches_cpu() -> None:
    if DEMO.is_file():
        model = cir.load_model(DEMO)
        dims = model.graph.inputs[0].shape
        shape = tuple(d if isinstance(d, int) else 4 for d in dims)
    else:
        model = ir.serde.deserialize_model(small_model())
        shape = (4, 3, 8, 8)
    name = model.graph.inputs[0].name
    feeds = {name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    cpu, cuda = get_backend("cpu"), get_backend("cuda")
    session = cuda.session(model)
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    expected = cpu.run(cpu.session(model), feeds)
    outputs = cuda.run(session, feeds)
    assert len(outputs) == len(expected)
    for out, ref in zip(outputs, expected, strict=True):
        np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-4)


def test_op_onnxruntime_has_no_kernel_for_is_a_clear_model_error() -> None:
    """A double-precision Conv: valid ONNX that onnxruntime's CPU provider cannot run."""
    weight = helper.make_tensor("w", TensorProto.DOUBLE, [2, 1, 1, 1], [1.0, 2.0])
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="conv_f64")
    io = [helper.make_tensor_value_info(n, TensorProto.DOUBLE, [1, c, 4, 4]) for n, c in (("x", 1), ("y", 2))]
    model = helper.make_model(helper.make_graph([conv], "g", io[:1], io[1:], [weight]))
    with pytest.raises(ModelError, match=r"has no Conv kernel for the input types of node 'conv_f64'; convert"):
        runtime.make_session(model)


def test_model_newer_than_onnxruntime_is_a_clear_model_error() -> None:
    """Seen on a GPU machine: onnx 1.23 writes IR 14, which onnxruntime 1.31 cannot read."""
    model = conv_bn_model()
    model.ir_version = 99
    with pytest.raises(ModelError, match=r"IR version 99 is newer than onnxruntime .* ir_version=\d+"):
        runtime.make_session(model)
