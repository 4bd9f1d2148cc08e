"""results/prune.md: our structured pruning on ONNX beside Torch-Pruning on the same torch models.

    python -m benchmarks.run --only prune [--models resnet mobilenetv2]

Ours takes the zoo's ONNX file (`compressor.compress(prune=...)`), with the zoo's calibration set
(mean compensation) and, in the fine-tuned rows, the Fashion-MNIST training split (`--train`).
Torch-Pruning needs the torch model, so it has no rows on the demo and on EfficientNet.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks import peers
from benchmarks.harness import Method
from benchmarks.run import Table
from benchmarks.zoo import CACHE, ZooModel

FRACTIONS = (0.3, 0.5, 0.7)
EPOCHS = 2  # ours, fine-tuned rows; Torch-Pruning's fine-tuned row trains 1 epoch with its own loop
TRAIN_SAMPLES = 30000  # of the 60k training images, for ours (Torch-Pruning's epoch sees all 60k)
TRAIN_FILE = CACHE / "fmnist_train.npz"
LATENCY_BATCHES = (1, 8, 64)


def _train_file() -> Path:
    """The Fashion-MNIST training split as the zoo's models read it (x: pixels / 255, y: labels), cached."""
    if not TRAIN_FILE.is_file():
        from benchmarks.zoo_build import to_input
        from compressor.fashion_mnist import load_fashion_mnist

        images, labels = load_fashion_mnist("train")
        TRAIN_FILE.parent.mkdir(parents=True, exist_ok=True)
        partial = TRAIN_FILE.with_suffix(".partial.npz")
        np.savez(partial, x=to_input(images), y=labels.astype(np.int64))
        partial.replace(TRAIN_FILE)
    return TRAIN_FILE


def _ours(model: ZooModel, out_path: Path, fraction: float, method: str = "l1", train: bool = False) -> Path:
    from compressor import compress

    if train and (not model.true_labels or model.input_shape != (1, 28, 28)):
        raise peers.NotApplicable("fine-tuning is wired for the Fashion-MNIST models only")
    settings = {
        "fraction": fraction,
        "method": method,
        **({"epochs": EPOCHS, "train_samples": TRAIN_SAMPLES} if train else {}),
    }
    result = compress(
        model.onnx_path, prune=settings, calib=model.calib_path, train=_train_file() if train else None,
        measure_latency=False, measure_fidelity=False, progress=False,
    )  # fmt: skip
    result.save(out_path)
    return out_path


# Module-level functions: the harness runs each in a child process by name.
def ours_l1_30(model: ZooModel, out_path: Path) -> Path:
    return _ours(model, out_path, 0.3)


def ours_l1_50(model: ZooModel, out_path: Path) -> Path:
    return _ours(model, out_path, 0.5)


def ours_l1_60(model: ZooModel, out_path: Path) -> Path:
    return _ours(model, out_path, 0.6)


def ours_l1_70(model: ZooModel, out_path: Path) -> Path:
    return _ours(model, out_path, 0.7)


def ours_lrp_30(model: ZooModel, out_path: Path) -> Path:
    return _ours(model, out_path, 0.3, "lrp")


def ours_lrp_50(model: ZooModel, out_path: Path) -> Path:
    return _ours(model, out_path, 0.5, "lrp")


def ours_lrp_70(model: ZooModel, out_path: Path) -> Path:
    return _ours(model, out_path, 0.7, "lrp")


def ours_l1_50_tuned(model: ZooModel, out_path: Path) -> Path:
    return _ours(model, out_path, 0.5, train=True)


def ours_l1_70_tuned(model: ZooModel, out_path: Path) -> Path:
    return _ours(model, out_path, 0.7, train=True)


def ours_lrp_70_tuned(model: ZooModel, out_path: Path) -> Path:
    return _ours(model, out_path, 0.7, "lrp", train=True)


def _method(name: str, family: str, fn: Callable[[ZooModel, Path], Path]) -> Method:
    return Method(name, family, "prune", fn, latency_batches=LATENCY_BATCHES)


TUNED = f"{EPOCHS} epochs fine-tune on {TRAIN_SAMPLES // 1000}k"
OURS = [
    _method("ours L1, 30% MACs, no fine-tune", "ours", ours_l1_30),
    _method("ours L1, 50% MACs, no fine-tune", "ours", ours_l1_50),
    _method("ours L1, 60% MACs, no fine-tune", "ours", ours_l1_60),
    _method("ours L1, 70% MACs, no fine-tune", "ours", ours_l1_70),
    _method("ours LRP, 30% MACs, no fine-tune", "ours", ours_lrp_30),
    _method("ours LRP, 50% MACs, no fine-tune", "ours", ours_lrp_50),
    _method("ours LRP, 70% MACs, no fine-tune", "ours", ours_lrp_70),
    _method(f"ours L1, 50% MACs, {TUNED}", "ours", ours_l1_50_tuned),
    _method(f"ours L1, 70% MACs, {TUNED}", "ours", ours_l1_70_tuned),
    _method(f"ours LRP, 70% MACs, {TUNED}", "ours", ours_lrp_70_tuned),
]
PEERS = [
    _method("Torch-Pruning L1 uniform, ~60% MACs, no fine-tune", "peer", peers.tp_uniform),
    _method("Torch-Pruning L1 global, ~60% MACs, no fine-tune", "peer", peers.tp_global),
    _method("Torch-Pruning L1 uniform, ~60% MACs, 1 epoch fine-tune", "peer", peers.tp_uniform_finetuned),
]
PRUNE = [*OURS, *PEERS]

TABLE = Table(
    "prune",
    "Structured pruning: ours on ONNX vs Torch-Pruning on the torch model",
    PRUNE,
    [
        "*ours* is `compressor.compress(model.onnx, prune={'fraction': f})` on the zoo's ONNX file: channel "
        "groups found by the dependency analysis, L1 filter norms ranked globally, channel counts in multiples "
        "of 8, removed channels' means folded into the next biases (from the zoo's calibration set). The "
        f"fine-tuned rows add `--train` (the first {TRAIN_SAMPLES} images of the Fashion-MNIST training split, "
        f"{EPOCHS} epochs, Adam, distilled from the original model, best held-out epoch kept). *LRP* scores "
        "channels by their relevance to the true class on the zoo's calibration set (256 images, labelled).",
        "Torch-Pruning (MetaPruner, MagnitudeImportance p=1) on the torch model, classifier kept, pruning ratio "
        "bisected to ~60% MACs removed, channel counts not rounded (`round_to=None`, its default), exported "
        "with torch.onnx.export(dynamo=True); its fine-tuned row trains 1 epoch with the zoo's own training "
        "loop. It needs the torch model, so the demo and EfficientNet rows are not applicable.",
    ],
)

