"""Model zoo: names, the packaged demo entry, architectures and (slow) export checks. No training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")

from benchmarks import models, zoo, zoo_build  # noqa: E402

FMNIST = ["resnet", "mobilenetv2", "squeezenet", "shufflenetv2", "vgg"]
IMAGENET = ["efficientnet_lite0", "resnet18_224", "resnet50_224"]


def test_names_cover_the_zoo() -> None:
    assert set(zoo.names()) == {"demo", *FMNIST, *IMAGENET}
    assert zoo.names()[0] == "demo"


def test_demo_entry_matches_its_onnx_input() -> None:
    model = zoo.get("demo")
    for path in (model.onnx_path, model.calib_path, model.eval_path):
        assert path.is_file()
    dims = onnx.load(model.onnx_path).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param  # symbolic batch
    assert tuple(d.dim_value for d in dims[1:]) == model.input_shape == (1, 28, 28)
    with np.load(model.eval_path) as data:
        assert data["x"].shape[1:] == model.input_shape
        assert data["x"].dtype == np.float32
        assert len(data["y"]) == len(data["x"])
    assert model.true_labels
    assert model.fp32_top1 is not None and model.fp32_top1 > 0.9


def test_get_rejects_unknown_requests() -> None:
    with pytest.raises(KeyError, match="unknown zoo model"):
        zoo.get("alexnet")
    with pytest.raises(ValueError, match="exporter"):
        zoo.get("demo", exporter="tflite")
    with pytest.raises(ValueError, match="dynamo"):
        zoo.get("demo", exporter="legacy")


def test_get_without_build_raises_when_not_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(zoo, "CACHE", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"benchmarks\.zoo build vgg"):
        zoo.get("vgg", build=False)


@pytest.mark.parametrize("name", ["demo", *FMNIST])
def test_fmnist_architectures_give_10_logits(name: str) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        logits = zoo.build_torch(name).eval()(torch.rand(2, 1, 28, 28))
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_architectures_give_1000_logits(name: str) -> None:
    with torch.no_grad():
        logits = zoo.build_torch(name).eval()(torch.rand(2, 3, 224, 224))
    assert logits.shape == (2, 1000)


def test_architectures_have_the_patterns_they_stand_for() -> None:
    resnet = zoo.build_torch("resnet")
    shortcuts = [m.downsample for m in resnet.modules() if isinstance(m, models.BasicBlock)]
    strided = [s for s in shortcuts if isinstance(s, torch.nn.Sequential) and s[0].stride == (2, 2)]
    assert strided and strided[0][0].kernel_size == (1, 1)
    assert any(isinstance(s, torch.nn.Identity) for s in shortcuts)
    mobile = zoo.build_torch("mobilenetv2")
    depthwise = [m for m in mobile.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert any(m.residual for m in mobile.modules() if isinstance(m, models.InvertedResidual))
    assert any(isinstance(m, models.Fire) for m in zoo.build_torch("squeezenet").modules())
    units = [m for m in zoo.build_torch("shufflenetv2").modules() if isinstance(m, models.ShuffleUnit)]
    assert {u.stride for u in units} == {1, 2}
    linears = [m for m in zoo.build_torch("vgg").modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1152, 512), (512, 512), (512, 10)]


def test_channel_shuffle_is_an_interleaving_permutation() -> None:
    x = torch.arange(8.0).reshape(1, 8, 1, 1).repeat(3, 1, 2, 2)
    out = models.channel_shuffle(x, 2)
    assert out.shape == x.shape
    assert out[0, :, 0, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert sorted(out[1, :, 1, 1].tolist()) == list(range(8))
    # Shuffling by 2 then by 4 (the inverse for 8 channels) restores the input.
    assert torch.equal(models.channel_shuffle(out, 4), x)


def test_calibrate_batchnorm_matches_activation_statistics() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    batches = [torch.randn(8, 3, 5, 5) * 3 + 1 for _ in range(4)]
    models.calibrate_batchnorm(model, batches)
    with torch.no_grad():
        conv_out = torch.cat([model[0](b) for b in batches])
    assert not model.training
    torch.testing.assert_close(model[1].running_mean, conv_out.mean((0, 2, 3)), rtol=1e-4, atol=1e-4)


def test_calibrate_classifier_spreads_logits_per_image() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 50))
    batches = [torch.rand(32, 16) + 5.0 for _ in range(2)]  # positive, alike features, as after ReLU + pooling
    models.calibrate_classifier(model, batches, logit_std=3.0)
    with torch.no_grad():
        logits = torch.cat([model(b) for b in batches])
    assert abs(float(logits.std()) - 3.0) < 0.1
    assert len(set(logits.argmax(1).tolist())) > 10


def test_photo_crops_are_deterministic_and_distinct_by_seed() -> None:
    first, again, other = (zoo_build.photo_crops(3, seed, size=32) for seed in ([0, 1], [0, 1], [0, 2]))
    assert first.shape == (3, 32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    x = zoo_build.lite_input(first)
    assert x.shape == (3, 3, 32, 32) and x.min() >= -1.0 and x.max() <= 1.0


def _opset(path: Path) -> int:
    return next(o.version for o in onnx.load(path).opset_import if o.domain in ("", "ai.onnx"))


@pytest.mark.slow
def test_small_resnet_exports_with_both_exporters(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = zoo.build_torch("resnet").eval()
    x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    exports = zoo_build.export_all(model, tmp_path, ["dynamo", "legacy"], (1, 28, 28), x)
    assert _opset(tmp_path / "model.onnx") == 18
    assert _opset(tmp_path / "model_legacy.onnx") == 17
    for info in exports.values():
        assert info["max_abs_diff"] < 1e-4
        assert "Add" in info["ops"] and "Conv" in info["ops"]
