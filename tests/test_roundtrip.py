"""fp32 round trips: load -> import passes under VerifyNumerics -> CPU lowering -> save -> onnxruntime.

Every saved model is compared with the ORIGINAL file on onnxruntime (graph optimisations off on
both sides) at ``max|a-b| <= 1e-5 * max|ref| + 1e-7``, at batch 3 and batch 1 (dynamic batch).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import compressor.ir as cir
from compressor.backends import get_backend
from compressor.instruments import VerifyNumerics
from compressor.passes import import_passes
from compressor.pipeline import PassContext, Pipeline

torch = pytest.importorskip("torch")
nn = torch.nn
torch.set_num_threads(1)

DEMO = Path(__file__).resolve().parent.parent / "compressor" / "demo" / "demo.onnx"
RTOL, ATOL = 1e-5, 1e-7
INPUT_SHAPE = (3, 16, 16)


def compress_file(src: Path, dst: Path) -> onnx.ModelProto:
    """The fp32 path of ``compress``: load, import passes with numerics checked, lower for CPU, save."""
    model = cir.load_model(src)
    Pipeline(import_passes()).run(model, PassContext(), [VerifyNumerics()])
    lowered = get_backend("cpu").lower(model)
    cir.save_model(lowered, dst)
    return lowered


def ort_run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    """Run a model file unoptimised, so the reference is the file as written."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def check_equal_outputs(src: Path, dst: Path, shape: tuple[int, ...], batches: tuple[int, ...] = (3, 1)) -> float:
    """Assert ``dst`` matches ``src`` on random inputs; return the worst error relative to max|ref|."""
    rng, worst = np.random.default_rng(0), 0.0
    for batch in batches:
        x = rng.standard_normal((batch, *shape)).astype(np.float32)
        reference, outputs = ort_run(src, x), ort_run(dst, x)
        assert len(reference) == len(outputs)
        for ref, out in zip(reference, outputs, strict=True):
            assert ref.shape == out.shape and ref.shape[0] == batch and ref.dtype == out.dtype
            diff, scale = float(np.max(np.abs(ref.astype(np.float64) - out))), float(np.max(np.abs(ref)))
            assert diff <= RTOL * scale + ATOL, f"batch {batch}: max|a-b| = {diff:.3g}, max|ref| = {scale:.3g}"
            worst = max(worst, diff / scale if scale else diff)
    return worst


def op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class ResNetBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 8), nn.ReLU())
        self.body = nn.Sequential(conv_bn(8, 16, stride=2), nn.ReLU(), conv_bn(16, 16))
        self.shortcut = conv_bn(8, 16, k=1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return torch.relu(self.body(x) + self.shortcut(x))


class InvertedResidual(nn.Module):
    def __init__(self, c: int = 8, hidden: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, c), nn.ReLU6())
        depthwise = conv_bn(hidden, hidden, groups=hidden)
        self.block = nn.Sequential(conv_bn(c, hidden, 1), nn.ReLU6(), depthwise, nn.ReLU6(), conv_bn(hidden, c, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return x + self.block(x)


class Fire(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
        self.expand1 = nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU())
        self.expand3 = nn.Sequential(conv_bn(4, 8), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.squeeze(x)
        return torch.cat([self.expand1(s), self.expand3(s)], dim=1)


class ShuffleUnit(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        h = c // 2
        self.stem = nn.Sequential(conv_bn(3, c), nn.ReLU())
        self.branch = nn.Sequential(conv_bn(h, h, 1), nn.ReLU(), conv_bn(h, h, groups=h), conv_bn(h, h, 1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.stem(x).chunk(2, dim=1)
        y = torch.cat([a, self.branch(b)], dim=1)
        n, c, h, w = y.shape
        return y.reshape(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


class TinyVGG(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        pool = nn.MaxPool2d(2)
        self.features = nn.Sequential(
            conv_bn(3, 8), nn.ReLU(), conv_bn(8, 8), nn.ReLU(), pool, conv_bn(8, 16), nn.ReLU(), pool
        )
        self.classifier = nn.Sequential(nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


TORCH_MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet_block": ResNetBlock,
    "mobilenetv2_inverted_residual": InvertedResidual,
    "squeezenet_fire": Fire,
    "shufflenet_unit": ShuffleUnit,
    "vgg_linear": TinyVGG,
}
# legacy: opset 17, constant folding on (torch fuses Conv+BN itself); legacy_bn: folding off, BN nodes kept.
# dynamo: opset 18, torch's ONNX optimizer on (fuses Conv+BN); dynamo_bn: optimizer off, BN nodes kept.
EXPORTERS = ("legacy", "legacy_bn", "dynamo", "dynamo_bn")
KEEPS_BN = {"legacy_bn", "dynamo_bn"}


def build(name: str) -> nn.Module:
    """A seeded eval-mode model whose BatchNorms have non-trivial running stats and affine terms."""
    torch.manual_seed(0)
    model = TORCH_MODELS[name]()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.eval()


def export(model: nn.Module, exporter: str, path: Path, *, external_data: bool = False) -> None:
    x, names = torch.randn(2, *INPUT_SHAPE), {"input_names": ["input"], "output_names": ["output"]}
    if exporter.startswith("dynamo"):
        batch = torch.export.Dim("batch", min=1, max=1024)
        optimize = exporter == "dynamo"
        kwargs = {"dynamic_shapes": {"x": {0: batch}}, "optimize": optimize, "external_data": external_data}
        torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=18, **kwargs, **names)
    else:
        kwargs = {"dynamic_axes": {"input": {0: "batch"}}, "do_constant_folding": exporter == "legacy"}
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, **kwargs, **names)


def grid() -> list:
    params = []
    for name in sorted(TORCH_MODELS):
        for exporter in EXPORTERS:
            marks = [pytest.mark.slow] if exporter.startswith("dynamo") else []
            params.append(pytest.param(name, exporter, marks=marks, id=f"{name}-{exporter}"))
    return params


@pytest.mark.parametrize(("name", "exporter"), grid())
def test_torch_model_round_trip(name: str, exporter: str, tmp_path: Path) -> None:
    src, dst = tmp_path / "src" / "model.onnx", tmp_path / "out.onnx"
    src.parent.mkdir()
    export(build(name), exporter, src)
    original = onnx.load(str(src))
    assert original.graph.input[0].type.tensor_type.shape.dim[0].dim_param, "export lost the dynamic batch dim"
    had_bn = "BatchNormalization" in op_types(original)
    assert had_bn or exporter not in KEEPS_BN, f"the {exporter} export was expected to keep BatchNormalization"

    lowered = compress_file(src, dst)

    assert "BatchNormalization" not in op_types(lowered)
    assert lowered.graph.input[0].type.tensor_type.shape.dim[0].dim_param, "dynamic batch dim lost"
    worst = check_equal_outputs(src, dst, INPUT_SHAPE)
    print(f"{name}/{exporter}: bn_in_source={had_bn} max_rel_err={worst:.3g}")


def conv_bn_model(opset: int = 17, channels: int = 8) -> onnx.ModelProto:
    """X[N,3,8,8] -> Conv(W, B) -> BatchNormalization -> Relu -> Y, with non-trivial statistics."""
    rng = np.random.default_rng(0)
    arrays = {
        "W": rng.standard_normal((channels, 3, 3, 3)) * 0.3,
        "B": rng.uniform(-0.5, 0.5, channels),
        "gamma": rng.uniform(0.5, 1.5, channels),
        "beta": rng.uniform(-0.5, 0.5, channels),
        "mean": rng.uniform(-0.5, 0.5, channels),
        "var": rng.uniform(0.5, 2.0, channels),
    }
    nodes = [
        helper.make_node("Conv", ["X", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b"], epsilon=1e-3),
        helper.make_node("Relu", ["b"], ["Y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_bn",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", channels, 8, 8])],
        [numpy_helper.from_array(a.astype(np.float32), name) for name, a in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7 if opset < 15 else 8)
    onnx.checker.check_model(model)
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return path


def test_helper_conv_bn_is_folded(tmp_path: Path) -> None:
    src, dst = save(conv_bn_model(), tmp_path / "bn.onnx"), tmp_path / "out.onnx"
    assert op_types(compress_file(src, dst)) == ["Conv", "Relu"]
    check_equal_outputs(src, dst, (3, 8, 8))


def test_fold_batchnorm_with_computed_zero_bias(tmp_path: Path) -> None:
    """torch.onnx.export(dynamo=True, optimize=False) gives a bias-free Conv a zero bias built from Shape(W)."""
    model = conv_bn_model(opset=18)
    model.graph.node[0].input[2] = "zero_bias"
    del model.graph.initializer[1]  # B
    prefix = [
        helper.make_node("Shape", ["W"], ["w_shape"], start=0, end=1),
        helper.make_node("Constant", [], ["zero"], value_float=0.0),
        helper.make_node("CastLike", ["zero", "X"], ["zero_like"]),
        helper.make_node("Expand", ["zero_like", "w_shape"], ["zero_bias"]),
    ]
    for index, node in enumerate(prefix):
        model.graph.node.insert(index, node)
    src, dst = save(model, tmp_path / "bn.onnx"), tmp_path / "out.onnx"
    lowered = compress_file(src, dst)
    check_equal_outputs(src, dst, (3, 8, 8))
    assert "BatchNormalization" not in op_types(lowered)


def test_opset11_is_upgraded_to_13(tmp_path: Path) -> None:
    """Conv+BN+Relu, then ops whose signature changed in opset 13 (Split, ReduceSum, Squeeze)."""
    model = conv_bn_model(opset=11, channels=4)
    model.graph.node[-1].output[0] = "r"
    model.graph.node.extend(
        [
            helper.make_node("Split", ["r"], ["h0", "h1"], axis=1, split=[2, 2]),
            helper.make_node("Add", ["h0", "h1"], ["s"]),
            helper.make_node("ReduceSum", ["s"], ["m"], axes=[2, 3], keepdims=1),
            helper.make_node("Squeeze", ["m"], ["q"], axes=[2, 3]),
            helper.make_node("Softmax", ["q"], ["Y"], axis=1),
        ]
    )
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 2]))
    src, dst = save(model, tmp_path / "op11.onnx"), tmp_path / "out.onnx"
    compress_file(src, dst)
    saved = onnx.load(str(dst))
    assert {o.domain: o.version for o in saved.opset_import}.get("") == 13
    assert "BatchNormalization" not in op_types(saved)
    onnx.checker.check_model(saved, full_check=True)
    check_equal_outputs(src, dst, (3, 8, 8))


@pytest.mark.skipif(not DEMO.is_file(), reason=f"demo model not shipped yet: {DEMO}")
def test_demo_model_round_trip(tmp_path: Path) -> None:
    dst = tmp_path / "demo_out.onnx"
    compress_file(DEMO, dst)
    dims = onnx.load(str(DEMO), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    batches = (dims[0].dim_value,) if dims[0].dim_value else (3, 1)
    check_equal_outputs(DEMO, dst, tuple(d.dim_value for d in dims[1:]), batches)


def save_with_external_data(source: str, path: Path) -> tuple[int, ...]:
    """Write a model whose weights live in a side file; return its per-sample input shape."""
    if source == "torch_dynamo":  # torch's default layout: weights in model.onnx.data
        export(build("resnet_block"), "dynamo", path, external_data=True)
        return INPUT_SHAPE
    layout = {"all_tensors_to_one_file": True, "size_threshold": 0, "location": "w.bin"}
    onnx.save_model(conv_bn_model(), str(path), save_as_external_data=True, **layout)
    return (3, 8, 8)


@pytest.mark.parametrize("source", ["onnx_w_bin", pytest.param("torch_dynamo", marks=pytest.mark.slow)])
def test_external_data_input_round_trips(source: str, tmp_path: Path) -> None:
    """External weights load, the output is one self-contained file, and the inputs are untouched."""
    src, dst = tmp_path / "src" / "model.onnx", tmp_path / "out.onnx"
    src.parent.mkdir()
    shape = save_with_external_data(source, src)
    before = {p.name: sha256(p) for p in src.parent.iterdir()}
    assert len(before) == 2, f"expected the model and one weights file, got {sorted(before)}"

    compress_file(src, dst)

    assert {p.name: sha256(p) for p in src.parent.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "src"]
    assert dst.stat().st_size < 2**31
    saved = onnx.load(str(dst), load_external_data=False)
    assert all(t.data_location != TensorProto.EXTERNAL for t in saved.graph.initializer)
    check_equal_outputs(src, dst, shape)


def test_save_model_goes_external_above_threshold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = save(conv_bn_model(channels=32), tmp_path / "bn.onnx"), tmp_path / "out.onnx"
    model = cir.load_model(src)
    Pipeline(import_passes()).run(model, PassContext(), [VerifyNumerics()])
    assert cir.weight_bytes(model) > 1000

    monkeypatch.setattr(cir, "EXTERNAL_DATA_THRESHOLD_BYTES", 1000)
    written = cir.save_model(model, dst)

    data = tmp_path / "out.onnx.data"
    assert set(written) == {data, dst}
    assert data.is_file() and data.stat().st_size > 1000
    saved = onnx.load(str(dst), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in saved.graph.initializer)
    assert not list(tmp_path.glob(".compressor-*")), "temporary folder left behind"
    ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])  # loads from its path
    check_equal_outputs(src, dst, (3, 8, 8))
