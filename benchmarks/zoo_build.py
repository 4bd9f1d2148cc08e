"""Building zoo models: Fashion-MNIST training, photo crops, ONNX export and its checks.

`benchmarks.zoo` holds the cache and the API; this module makes one model's files in a
folder: ``model.onnx`` (dynamo exporter, opset 18), ``model_legacy.onnx`` (TorchScript
exporter, opset 17; Fashion-MNIST models only), ``state.pt``, ``calib.npz`` and ``eval.npz``.
"""

from __future__ import annotations

import functools
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from benchmarks import models
from compressor.fashion_mnist import load_fashion_mnist

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 18
LEGACY_OPSET = 17
EXPORTERS: dict[str, tuple[str, bool, int]] = {  # exporter -> (file, dynamo?, opset)
    "dynamo": ("model.onnx", True, OPSET),
    "legacy": ("model_legacy.onnx", False, LEGACY_OPSET),
}
FMNIST_EPOCHS: dict[str, int] = {"resnet": 6, "mobilenetv2": 5, "squeezenet": 5, "shufflenetv2": 8, "vgg": 5}
FMNIST_CALIB, FMNIST_EVAL = 512, 2000
CONFIDENT_MARGIN = 0.1  # fp32 top-1 minus top-2 probability of a "confident" crop
BN_BATCHES, BN_BATCH = 20, 16  # BatchNorm calibration of the random-weight ResNets
LOGIT_STD = 3.0  # their logits' spread: median top-1 probability ~0.2, as EfficientNet-Lite0 on these crops
PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "hubble_deep_field",
    "immunohistochemistry", "retina", "stereo_motorcycle", "clock", "moon", "brick", "grass", "gravel",
)  # fmt: skip
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


@functools.lru_cache(maxsize=1)
def load_photos() -> tuple[np.ndarray, ...]:
    """The `skimage.data` photos that load offline, as uint8 ``[H, W, 3]`` (gray ones replicated)."""
    import skimage.data

    photos = []
    for name in PHOTOS:
        try:
            image = getattr(skimage.data, name)()
        except Exception:  # noqa: BLE001 - some images need a download (pooch); skip them
            continue
        image = np.asarray(image[0] if isinstance(image, tuple) else image)
        photos.append(np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3])
    if not photos:
        raise RuntimeError("no scikit-image photo could be loaded")
    return tuple(photos)


def photo_crops(count: int, seed: int | list[int], size: int = 224) -> np.ndarray:
    """``count`` random square crops (30-100% of the short side, random position and flip), resized.

    Returns uint8 ``[count, size, size, 3]``; the same ``seed`` gives the same crops.
    """
    from skimage.transform import resize

    photos, rng = load_photos(), np.random.default_rng(seed)
    out = np.empty((count, size, size, 3), np.uint8)
    for i in range(count):
        photo = photos[rng.integers(len(photos))]
        height, width = photo.shape[:2]
        side = max(8, int(min(height, width) * rng.uniform(0.3, 1.0)))
        top, left = rng.integers(height - side + 1), rng.integers(width - side + 1)
        crop = photo[top : top + side, left : left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = np.round(resize(crop, (size, size), anti_aliasing=True, preserve_range=True)).astype(np.uint8)
    return out


def lite_input(crops: np.ndarray) -> np.ndarray:
    """uint8 NHWC crops -> EfficientNet-Lite input: float32 NCHW, (x - 127.5) / 127.5."""
    return np.ascontiguousarray(((crops.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2))


def imagenet_input(crops: np.ndarray) -> np.ndarray:
    """uint8 NHWC crops -> torchvision-style ResNet input: float32 NCHW, (x / 255 - mean) / std."""
    return np.ascontiguousarray(
        ((crops.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2)
    )


@dataclass(frozen=True)
class PhotoSpec:
    """Inputs of an ImageNet-style model: preprocessing and how many crops per set."""

    preprocess: Callable[[np.ndarray], np.ndarray]
    n_calib: int
    n_eval: int


IMAGENET: dict[str, PhotoSpec] = {
    "efficientnet_lite0": PhotoSpec(lite_input, 256, 512),
    "resnet18_224": PhotoSpec(imagenet_input, 64, 64),
    "resnet50_224": PhotoSpec(imagenet_input, 512, 64),
}


# --- Fashion-MNIST training and ONNX export ----------------------------------------------------------------


def to_input(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, 28, 28]`` images -> float32 ``[N, 1, 28, 28]`` in ``[0, 1]``."""
    return (images.astype(np.float32) / 255.0)[:, None]


def seed_everything(seed: int) -> None:
    """Seed torch and numpy and make torch deterministic on 2 CPU threads."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)


def train(
    model: nn.Module,
    epochs: int,
    seed: int,
    *,
    lr: float = 4e-3,
    batch_size: int = 128,
    log: Callable[[str], None] = print,
) -> nn.Module:
    """Train ``model`` on the Fashion-MNIST train split; return it in eval mode.

    Adam with a one-cycle schedule, random horizontal flips, cross-entropy loss.
    Deterministic for a given ``seed`` on the same machine and thread count.
    """
    seed_everything(seed)
    images, labels = load_fashion_mnist("train")
    x_all = torch.from_numpy(to_input(images))
    y_all = torch.from_numpy(labels)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(x_all) / batch_size)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch)
    model.train()
    for epoch in range(epochs):
        start, total_loss, correct = time.perf_counter(), 0.0, 0
        for idx in torch.randperm(len(x_all), generator=gen).split(batch_size):
            x, y = x_all[idx], y_all[idx]
            flip = torch.rand(len(x), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            logits = model(x.contiguous(memory_format=torch.channels_last))
            loss = nn.functional.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(x)
            correct += int((logits.argmax(1) == y).sum())
        log(
            f"epoch {epoch + 1}/{epochs}: loss {total_loss / len(x_all):.4f}, "
            f"train acc {correct / len(x_all):.4f}, {time.perf_counter() - start:.0f} s"
        )
    return model.to(memory_format=torch.contiguous_format).eval()


def _drop_stack_traces(model: onnx.ModelProto) -> None:
    """Remove the exporter's per-node Python stack traces (absolute paths, line numbers)."""
    for node in model.graph.node:
        keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)


def export(
    model: nn.Module,
    path: Path,
    dynamo: bool = True,
    *,
    input_shape: tuple[int, ...] = (1, 28, 28),
    opset: int = OPSET,
) -> None:
    """Export ``model`` (in eval mode) to a self-contained ONNX file.

    The batch dimension is symbolic (``batch``). ``dynamo=True`` uses the torch.export-based
    exporter, ``dynamo=False`` the TorchScript one. With torch 2.13 both fold eval-mode
    BatchNorm into Conv (the dynamo exporter through its onnxscript optimizer), and the
    dynamo one writes ``AdaptiveAvgPool2d(1)`` as ReduceMean rather than GlobalAveragePool.
    """
    model.eval()
    example = (torch.zeros(2, *input_shape),)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME]}
    if dynamo:
        program = torch.onnx.export(
            model,
            example,
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            **names,
        )
        assert program is not None
        proto = program.model_proto
        _drop_stack_traces(proto)
        onnx.save_model(proto, path)
    else:
        torch.onnx.export(
            model,
            example,
            path,
            dynamo=False,
            opset_version=opset,
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            **names,
        )
    onnx.checker.check_model(str(path), full_check=True)


def onnx_logits(path: Path, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Run the ONNX model on ``x`` with onnxruntime (CPU) and return its logits."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    chunks = [session.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(chunks)


def check_export(model: nn.Module, path: Path, x: np.ndarray, atol: float = 1e-4, rtol: float = 0.0) -> float:
    """Compare onnxruntime with torch on ``x``; raise if they differ by ``atol + rtol * max|logit|`` or more.

    Also checks that the ONNX input's batch dimension is symbolic. Returns the max
    absolute difference.
    """
    dims = onnx.load(path, load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    if not dims[0].dim_param or dims[0].HasField("dim_value"):
        raise RuntimeError(f"{path}: batch dimension of {INPUT_NAME!r} is not symbolic")
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(x)).numpy()
    diff = float(np.abs(onnx_logits(path, x, batch_size=32) - expected).max())
    if not diff < atol + rtol * float(np.abs(expected).max()):
        raise RuntimeError(f"{path}: onnxruntime differs from torch by {diff:.2e}")
    return diff


def op_counts(path: Path) -> Counter[str]:
    """Count the op types in the ONNX graph's main body."""
    return Counter(node.op_type for node in onnx.load(path, load_external_data=False).graph.node)


# --- building one model ------------------------------------------------------------------


def export_all(
    model: nn.Module,
    folder: Path,
    exporters: list[str],
    input_shape: tuple[int, ...],
    check_x: np.ndarray,
    rtol: float = 0.0,
) -> dict[str, dict]:
    """Export with each exporter, check against torch (`check_export`), return per-export meta."""
    out = {}
    for exporter in exporters:
        file, dynamo, opset = EXPORTERS[exporter]
        export(model, folder / file, dynamo, input_shape=input_shape, opset=opset)
        diff = check_export(model, folder / file, check_x, rtol=rtol)
        out[exporter] = {"file": file, "opset": opset, "max_abs_diff": diff, "ops": dict(op_counts(folder / file))}
    return out


def build_fmnist(name: str, seed: int, folder: Path, log: Callable[[str], None]) -> dict:
    """Train on Fashion-MNIST, save the state_dict and data sets, export with both exporters."""
    start = time.perf_counter()
    seed_everything(seed)  # before building: the initial weights come from the seed
    model = train(models.ARCHITECTURES[name](), FMNIST_EPOCHS[name], seed, log=log)
    train_s = time.perf_counter() - start
    torch.save(model.state_dict(), folder / "state.pt")
    train_images, train_labels = load_fashion_mnist("train")
    pick = np.sort(np.random.default_rng([seed, 1]).choice(len(train_images), FMNIST_CALIB, replace=False))
    np.savez_compressed(folder / "calib.npz", x=to_input(train_images[pick]), y=train_labels[pick])
    test_images, y_test = load_fashion_mnist("test")
    x_test = to_input(test_images)
    np.savez_compressed(folder / "eval.npz", x=x_test[:FMNIST_EVAL], y=y_test[:FMNIST_EVAL])
    exports = export_all(model, folder, list(EXPORTERS), (1, 28, 28), x_test[:512])
    for exp in exports.values():
        predictions = onnx_logits(folder / exp["file"], x_test).argmax(1)
        exp["test_top1"] = float((predictions == y_test).mean())
        exp["eval_top1"] = float((predictions[:FMNIST_EVAL] == y_test[:FMNIST_EVAL]).mean())
        log(f"{exp['file']}: test top-1 {exp['test_top1']:.4f}, onnxruntime vs torch {exp['max_abs_diff']:.1e}")
    return {
        "input_shape": [1, 28, 28],
        "true_labels": True,
        "torch_state": "state.pt",
        "epochs": FMNIST_EPOCHS[name],
        "train_s": round(train_s, 1),
        "n_calib": FMNIST_CALIB,
        "n_eval": FMNIST_EVAL,
        "exports": exports,
    }


def build_imagenet(name: str, seed: int, folder: Path, log: Callable[[str], None]) -> dict:
    """Load EfficientNet-Lite0 or make a random ResNet with calibrated BN and classifier; photo crops; export."""
    start, spec = time.perf_counter(), IMAGENET[name]
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    if name == "efficientnet_lite0":
        model, state = models.load_efficientnet_lite0(), None
    else:
        model, state = models.ARCHITECTURES[name](), "state.pt"
        bn_x = torch.from_numpy(spec.preprocess(photo_crops(BN_BATCHES * BN_BATCH, [seed, 3])))
        models.calibrate_batchnorm(model, bn_x.split(BN_BATCH))
        models.calibrate_classifier(model, bn_x.split(BN_BATCH), LOGIT_STD)
        torch.save(model.state_dict(), folder / state)
    setup_s = time.perf_counter() - start
    np.savez(folder / "calib.npz", x=spec.preprocess(photo_crops(spec.n_calib, [seed, 1])))
    x_eval = spec.preprocess(photo_crops(spec.n_eval, [seed, 2]))
    # 50 layers of float32 rounding: ResNet-50's logits (|max| ~10) differ by up to ~5e-4.
    exports = export_all(model, folder, ["dynamo"], (3, 224, 224), x_eval[:8], rtol=1e-4)
    logits = onnx_logits(folder / exports["dynamo"]["file"], x_eval, batch_size=32)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    top2 = np.sort(probs / probs.sum(1, keepdims=True), axis=1)[:, -2:]
    y, margin = logits.argmax(1), (top2[:, 1] - top2[:, 0]).astype(np.float32)
    np.savez(folder / "eval.npz", x=x_eval, y=y, margin=margin)
    exports["dynamo"]["eval_top1"] = 1.0
    confident, distinct = int((margin >= CONFIDENT_MARGIN).sum()), len(set(y.tolist()))
    log(f"{distinct} distinct fp32 classes; {confident}/{len(y)} crops with margin >= {CONFIDENT_MARGIN}")
    return {
        "input_shape": [3, 224, 224],
        "true_labels": False,
        "torch_state": state,
        "train_s": round(setup_s, 1),
        "n_calib": spec.n_calib,
        "n_eval": spec.n_eval,
        "confident": confident,
        "distinct_labels": distinct,
        "exports": exports,
    }
