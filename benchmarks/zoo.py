"""Model zoo: small CNNs trained on Fashion-MNIST and exported to ONNX.

Every model takes ``input`` float32 ``[batch, 1, 28, 28]`` (pixels / 255, no mean/std)
and returns ``logits`` ``[batch, 10]``. Add a model by writing a builder and listing it
in `MODELS`.

Rebuild the demo model that ships inside the package::

    python -m benchmarks.zoo demo
"""

from __future__ import annotations

import argparse
import math
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from compressor.fashion_mnist import load_fashion_mnist

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 18
DEMO_DIR = Path(__file__).resolve().parent.parent / "compressor" / "demo"
DEMO_SAMPLES = 512


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """3x3 Conv (no bias) + BatchNorm + ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class ResidualBlock(nn.Module):
    """Two 3x3 Conv+BN with an identity shortcut: ``relu(x + bn(conv(relu(bn(conv(x))))))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(channels, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.bn2(self.conv2(self.conv1(x))))


def build_demo() -> nn.Module:
    """The demo CNN: about 113k parameters and 8.6M MACs per image."""
    return nn.Sequential(
        conv_bn_relu(1, 32),  # 28x28
        nn.MaxPool2d(2),  # 14x14
        ResidualBlock(32),
        conv_bn_relu(32, 64, stride=2),  # 7x7
        conv_bn_relu(64, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


MODELS: dict[str, Callable[[], nn.Module]] = {
    "demo": build_demo,
}


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


def export(model: nn.Module, path: Path, dynamo: bool = True) -> None:
    """Export ``model`` (in eval mode) to a self-contained ONNX file, opset 18.

    The batch dimension is symbolic (``batch``). ``dynamo=True`` uses the torch.export-based
    exporter, ``dynamo=False`` the TorchScript one. With torch 2.13 both fold eval-mode
    BatchNorm into Conv (the dynamo exporter through its onnxscript optimizer), and the
    dynamo one writes ``AdaptiveAvgPool2d(1)`` as ReduceMean rather than GlobalAveragePool.
    """
    model.eval()
    example = (torch.zeros(2, 1, 28, 28),)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME]}
    if dynamo:
        program = torch.onnx.export(
            model,
            example,
            dynamo=True,
            opset_version=OPSET,
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
            opset_version=OPSET,
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            **names,
        )
    onnx.checker.check_model(onnx.load(path), full_check=True)


def onnx_logits(path: Path, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Run the ONNX model on ``x`` with onnxruntime (CPU) and return its logits."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    chunks = [session.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(chunks)


def check_export(model: nn.Module, path: Path, x: np.ndarray, atol: float = 1e-4) -> float:
    """Compare onnxruntime with torch on ``x``; raise if they differ by ``atol`` or more.

    Also checks that the ONNX input's batch dimension is symbolic. Returns the max
    absolute difference.
    """
    dims = onnx.load(path).graph.input[0].type.tensor_type.shape.dim
    if not dims[0].dim_param or dims[0].HasField("dim_value"):
        raise RuntimeError(f"{path}: batch dimension of {INPUT_NAME!r} is not symbolic")
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(x)).numpy()
    diff = float(np.abs(onnx_logits(path, x) - expected).max())
    if not diff < atol:
        raise RuntimeError(f"{path}: onnxruntime differs from torch by {diff:.2e}")
    return diff


def op_counts(path: Path) -> Counter[str]:
    """Count the op types in the ONNX graph's main body."""
    return Counter(node.op_type for node in onnx.load(path).graph.node)


def build_demo_package(epochs: int, seed: int, out_dir: Path = DEMO_DIR) -> float:
    """Train, export and verify the demo model; write the package data into ``out_dir``.

    Writes ``demo.onnx``, ``demo.npz`` (first 512 test images and labels) and
    ``README.md``. Returns the ONNX model's top-1 accuracy on the 10k test set.
    """
    start = time.perf_counter()
    seed_everything(seed)
    model = train(MODELS["demo"](), epochs, seed)
    train_s = time.perf_counter() - start
    onnx_path = out_dir / "demo.onnx"
    export(model, onnx_path, dynamo=True)

    test_images, test_labels = load_fashion_mnist("test")
    x_test = to_input(test_images)
    diff = check_export(model, onnx_path, x_test[:DEMO_SAMPLES])
    accuracy = float((onnx_logits(onnx_path, x_test).argmax(1) == test_labels).mean())
    np.savez_compressed(out_dir / "demo.npz", x=x_test[:DEMO_SAMPLES], y=test_labels[:DEMO_SAMPLES])
    params = sum(p.numel() for p in model.parameters())
    counts = op_counts(onnx_path)
    ops = ", ".join(f"{op} x{n}" for op, n in sorted(counts.items()))
    op_list = ", ".join(sorted(counts))
    lines = [
        f"Demo model for `compress --demo`: a small residual CNN ({params:,} parameters; {op_list}), opset {OPSET},",
        "input `input` [batch,1,28,28] = pixels/255, output `logits` [batch,10]. `demo.npz`: first 512 test `x`, `y`.",
        f"fp32 top-1 on the 10k Fashion-MNIST test set (onnxruntime): {accuracy:.4f}.",
        f"Built with `python -m benchmarks.zoo demo` ({epochs} epochs, seed {seed}; about 4 min on 2 idle cores).",
    ]
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")
    print(f"training + setup: {train_s:.0f} s; onnxruntime vs torch max abs diff {diff:.2e}")
    print(f"ops: {ops}")
    for name in ("demo.onnx", "demo.npz"):
        print(f"{name}: {(out_dir / name).stat().st_size / 1024:.0f} KiB")
    print(f"fp32 test top-1 (onnxruntime, 10k images): {accuracy:.4f}")
    return accuracy


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m benchmarks.zoo demo [--epochs N] [--seed S]``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.zoo", description=__doc__)
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.model == "demo":
        build_demo_package(args.epochs, args.seed)


if __name__ == "__main__":
    main()
