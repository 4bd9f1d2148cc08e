"""Image-folder data: preprocessing numerics, labels from sub-folders, errors, and int8 calibration on photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from skimage import data as photos

from compressor import cli, runtime
from compressor.api import compress
from compressor.errors import DataError, UsageError
from compressor.images import ImageFolder, Preprocess


def small_image_model(size: int = 32) -> onnx.ModelProto:
    """input[N, 3, size, size] -> Conv 3x3 -> Relu -> GlobalAveragePool -> Flatten -> Gemm(10)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.uniform(-0.5, 0.5, (8, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.uniform(-0.1, 0.1, 8).astype(np.float32), "b"),
        numpy_helper.from_array(rng.uniform(-0.5, 0.5, (10, 8)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(np.zeros(10, np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["c"], name="conv", pads=[1] * 4),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "images",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def specs(model: onnx.ModelProto) -> list[runtime.InputSpec]:
    import onnx_ir as ir

    return runtime.input_specs(ir.serde.deserialize_model(model))


@pytest.fixture
def photo_folder(tmp_path: Path) -> Path:
    """Real photos (scikit-image's bundled ones) in two class folders, JPEG and PNG."""
    root = tmp_path / "photos"
    pictures = {"cat": [photos.chelsea(), photos.coffee()], "person": [photos.astronaut(), photos.camera()]}
    for label, images in pictures.items():
        (root / label).mkdir(parents=True)
        for index, pixels in enumerate(images):
            Image.fromarray(pixels).save(root / label / f"{index}.{'jpg' if index else 'png'}")
    return root


def test_preprocess_parses_and_refuses() -> None:
    parsed = Preprocess.parse("resize=256,crop=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=NHWC")
    assert (parsed.resize, parsed.crop, parsed.layout) == (256, 224, "nhwc")
    assert parsed.mean == (0.485, 0.456, 0.406) and parsed.std == (0.229, 0.224, 0.225)
    for bad, words in (("size=3", "cannot read"), ("crop=big", "not a number"), ("layout=chw", "layout"),
                       ("std=0", "non-zero"), ("resize", "cannot read")):  # fmt: skip
        with pytest.raises(UsageError, match=words):
            Preprocess.parse(bad)


def test_solid_colour_comes_out_exactly_normalised(tmp_path: Path) -> None:
    Image.new("RGB", (50, 40), (255, 0, 128)).save(tmp_path / "solid.png")
    preprocess = Preprocess.parse("resize=36,crop=32,mean=0.5,std=0.25")
    feeds = ImageFolder(tmp_path, specs(small_image_model()), preprocess).first_batch(1)
    pixels = feeds["input"]
    assert pixels.shape == (1, 3, 32, 32) and pixels.dtype == np.float32
    expected = (np.array([255, 0, 128], np.float32) / 255 - 0.5) / 0.25
    np.testing.assert_allclose(pixels[0].reshape(3, -1), np.repeat(expected[:, None], 32 * 32, axis=1), atol=1e-6)


def test_photos_layouts_and_labels(photo_folder: Path) -> None:
    model = small_image_model()
    nchw = ImageFolder(photo_folder, specs(model), Preprocess.parse("resize=40,crop=32"))
    assert nchw.num_samples == 4 and nchw.has_labels
    batch = next(nchw.batches(batch_size=4))
    np.testing.assert_array_equal(batch.labels, [0, 0, 1, 1])  # cat/, person/ in sorted order
    assert batch.feeds["input"].shape == (4, 3, 32, 32)
    assert batch.feeds["input"].min() >= 0.0 and batch.feeds["input"].max() <= 1.0
    grey = batch.feeds["input"][3]  # camera() is greyscale: converted to three equal channels
    np.testing.assert_array_equal(grey[0], grey[1])
    nhwc_model = small_image_model()
    nhwc_model.graph.input[0].CopyFrom(helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 32, 32, 3]))
    nhwc = ImageFolder(photo_folder, specs(nhwc_model), Preprocess.parse("resize=40,crop=32,layout=nhwc"))
    np.testing.assert_array_equal(nhwc.first_batch(4)["input"], batch.feeds["input"].transpose(0, 2, 3, 1))


def test_a_fixed_batch_dimension_sets_every_batch(photo_folder: Path) -> None:
    model = small_image_model()
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32]))
    folder = ImageFolder(photo_folder, specs(model), Preprocess.parse("resize=40,crop=32"))
    assert folder.batch_size_for(2**22, 32) == 1
    assert [b.feeds["input"].shape[0] for b in folder.batches(batch_size=4)] == [1, 1, 1, 1]


def test_bad_folders_are_refused(tmp_path: Path, photo_folder: Path) -> None:
    model_specs = specs(small_image_model())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        ImageFolder(tmp_path / "empty", model_specs, Preprocess())
    with pytest.raises(UsageError, match="crop=64 but the model takes 32x32"):
        ImageFolder(photo_folder, model_specs, Preprocess(crop=64))
    (photo_folder / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    folder = ImageFolder(photo_folder, model_specs, Preprocess())
    with pytest.raises(DataError, match=r"broken\.jpg: cannot be read as an image"):
        folder.validate()


def test_int8_calibrates_on_a_photo_folder(tmp_path: Path, photo_folder: Path) -> None:
    model = small_image_model()
    result = compress(model, "int8", calib=photo_folder, preprocess="resize=40,crop=32", measure_latency=False)
    assert result.report.evaluation == {**result.report.evaluation, "source": "calib", "samples": 4}
    x = ImageFolder(photo_folder, specs(model), Preprocess.parse("resize=40,crop=32")).first_batch(4)
    reference = runtime.run(runtime.make_session(model), x)[0]
    quantized = runtime.run(runtime.make_session(result.lowered), x)[0]
    assert np.abs(quantized - reference).max() < 0.05 * np.abs(reference).max()
    with pytest.raises(UsageError, match="applies to image folders"):
        np.savez(tmp_path / "c.npz", x=x["input"])
        compress(model, "int8", calib=tmp_path / "c.npz", preprocess="crop=32")


def test_cli_takes_a_photo_folder(tmp_path: Path, photo_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    onnx.save(small_image_model(), tmp_path / "m.onnx")
    argv = [str(tmp_path / "m.onnx"), "--target", "int8", "--calib", str(photo_folder), "--no-latency"]
    assert cli.main([*argv, "--preprocess", "resize=40,crop=32"]) == 0
    assert "evaluated on 4 samples from calib data" in capsys.readouterr().out
    assert cli.main([*argv, "-o", str(tmp_path / "x.onnx"), "--preprocess", "crop=64"]) == 2
    assert "crop=64" in capsys.readouterr().err
