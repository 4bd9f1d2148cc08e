"""Fine-tuning an IR model in place, through the torch bridge: labels plus distillation, early stopping.

`fine_tune` trains every float initializer of the model on ``(x, y)`` with Adam.
The loss is cross-entropy on the labels plus, when the original model's outputs
(``teacher``) are given, ``distill`` times the KL divergence to them at
``temperature`` (Hinton et al.'s knowledge distillation: a pruned network
recovers faster from its parent's soft outputs than from labels alone). A seeded
``holdout`` share of the set is kept aside: each epoch ends with its top-1, the
weights of the best epoch are the ones written back, and training stops after
``patience`` epochs without a better one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import torch
import torch.nn.functional as F
from tqdm import tqdm

from compressor import runtime
from compressor.data import Samples
from compressor.errors import DataError
from compressor.torch_bridge import TorchBridge


@dataclass(frozen=True)
class TrainSettings:
    """How `fine_tune` trains: epochs, Adam's learning rate, batch size, early stopping, distillation."""

    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 64
    holdout: float = 0.1  # share of the training set held out to pick the best epoch
    patience: int = 2  # epochs without a better holdout top-1 before stopping
    distill: float = 1.0  # weight of the distillation term (0: labels only)
    temperature: float = 4.0


@dataclass(frozen=True)
class EpochRecord:
    """One epoch: mean training loss, holdout top-1, and seconds."""

    epoch: int
    train_loss: float
    holdout_top1: float
    seconds: float

    def as_dict(self) -> dict[str, float]:
        return {"epoch": self.epoch, "train_loss": round(self.train_loss, 5),
                "holdout_top1": round(self.holdout_top1, 5), "seconds": round(self.seconds, 2)}  # fmt: skip


def check_labels(y: np.ndarray, classes: int) -> None:
    """Labels must be class indices below the model's output size."""
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"training labels 'y' must be one class index per sample, got {y.dtype} {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= classes):
        raise DataError(
            f"training labels run from {y.min()} to {y.max()}, but the model outputs {classes} classes; "
            "pass labels that index its output"
        )


def fine_tune(
    model: ir.Model,
    x: np.ndarray,
    y: np.ndarray,
    teacher: np.ndarray | None = None,
    settings: TrainSettings | None = None,
    seed: int = 0,
    progress: bool = False,
) -> list[EpochRecord]:
    """Train ``model``'s float weights on ``x`` (inputs) and ``y`` (class indices) in place; the epochs' records.

    ``teacher``: the original model's logits on ``x``, for distillation. The model's first output
    must be the logits ``[N, classes]``.
    """
    settings = settings or TrainSettings()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    order = np.random.default_rng(seed).permutation(len(x))
    held = order[: round(settings.holdout * len(x))] if len(x) >= 20 else order[:0]
    train = order[len(held) :]
    bridge = TorchBridge(model)
    optimizer = torch.optim.Adam([p for p in bridge.parameters() if p.requires_grad], lr=settings.lr)
    steps = settings.epochs * math.ceil(len(train) / settings.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=max(steps, 1))
    inputs, labels = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64))
    soft = torch.from_numpy(teacher) if teacher is not None else None
    records: list[EpochRecord] = []
    best, best_state, stale = -1.0, None, 0
    for epoch in range(1, settings.epochs + 1):
        start, losses = time.perf_counter(), []
        bridge.train()
        permutation = torch.from_numpy(train)[torch.randperm(len(train), generator=generator)]
        batches = permutation.split(settings.batch_size)
        for batch in tqdm(batches, desc=f"fine-tuning, epoch {epoch}/{settings.epochs}", disable=not progress,
                          leave=False, unit="batch"):  # fmt: skip
            logits = bridge(inputs[batch])[0]
            loss = F.cross_entropy(logits, labels[batch])
            if soft is not None and settings.distill:
                t = settings.temperature
                target = F.log_softmax(soft[batch] / t, dim=1)
                kl = F.kl_div(F.log_softmax(logits / t, dim=1), target, log_target=True, reduction="batchmean")
                loss = loss + settings.distill * t * t * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
        top1 = _top1(bridge, inputs, labels, held, settings.batch_size) if len(held) else float("nan")
        records.append(EpochRecord(epoch, float(np.mean(losses)) if losses else 0.0, top1, time.perf_counter() - start))
        if not len(held) or top1 > best:
            best, stale = top1, 0
            best_state = [p.detach().clone() for p in bridge.parameters()]
        else:
            stale += 1
            if stale >= settings.patience:
                break
    if best_state is not None:
        with torch.no_grad():
            for parameter, value in zip(bridge.parameters(), best_state, strict=True):
                parameter.copy_(value)
    bridge.write_back()
    return records


def _top1(bridge: TorchBridge, inputs: torch.Tensor, labels: torch.Tensor, rows: np.ndarray, batch: int) -> float:
    bridge.eval()
    correct = 0
    with torch.no_grad():
        for chunk in torch.from_numpy(rows).split(batch * 4):
            correct += int((bridge(inputs[chunk])[0].argmax(dim=1) == labels[chunk]).sum())
    return correct / len(rows)


def read_arrays(samples: Samples, input_name: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The first ``limit`` samples (all: None) of a one-input data set as arrays: inputs, and labels if it has them."""
    batches = list(samples.batches(256, limit=limit))
    x = np.concatenate([batch.feeds[input_name] for batch in batches])
    labels = [batch.labels for batch in batches]
    return x, np.concatenate(labels) if samples.has_labels else None


def model_logits(model: ir.Model | onnx.ModelProto, input_name: str, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """The model's first output on ``x``, by onnxruntime, in batches."""
    session = runtime.make_session(model)
    return np.concatenate([session.run(None, {input_name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def first_output_classes(model: ir.Model) -> int | None:
    """The size of the model's first output's last axis (its classes), when static."""
    shape = model.graph.outputs[0].shape
    return shape[-1] if shape is not None and len(shape) >= 2 and isinstance(shape[-1], int) else None
