"""Model zoo: CNNs exported to ONNX, with calibration and evaluation sets, cached on disk.

Fashion-MNIST models (``resnet``, ``mobilenetv2``, ``squeezenet``, ``shufflenetv2``,
``vgg``) take ``input`` float32 ``[batch, 1, 28, 28]`` (pixels / 255) and return
``logits`` ``[batch, 10]``. The ImageNet-style ones (``efficientnet_lite0``,
``resnet18_224``, ``resnet50_224``) take ``[batch, 3, 224, 224]`` and return 1000 logits;
their evaluation labels are the fp32 model's own predictions. Torch definitions live in
`benchmarks.models`, training, photo crops and export in `benchmarks.zoo_build`. Cached under
``benchmarks/cache/<name>/`` (model.onnx, model_legacy.onnx, state.pt, calib.npz,
eval.npz, meta.json).

    python -m benchmarks.zoo build [NAMES...] [--seed S] [--force]   # build and cache, write results/zoo.md
    python -m benchmarks.zoo list                                   # name, cached?, fp32 top-1
    python -m benchmarks.zoo demo                                   # rebuild the packaged demo model
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import json
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from torch import nn

from benchmarks import models
from benchmarks.zoo_build import (
    CONFIDENT_MARGIN,
    EXPORTERS,
    FMNIST_EPOCHS,
    IMAGENET,
    INPUT_NAME,
    LEGACY_OPSET,
    OPSET,
    OUTPUT_NAME,
    build_fmnist,
    build_imagenet,
    check_export,
    export,
    onnx_logits,
    op_counts,
    seed_everything,
    to_input,
    train,
)
from compressor.fashion_mnist import load_fashion_mnist
from compressor.metrics import compute_cost

__all__ = [
    "CACHE",
    "INPUT_NAME",
    "LEGACY_OPSET",
    "OPSET",
    "OUTPUT_NAME",
    "ZooModel",
    "build_model",
    "build_torch",
    "check_export",
    "export",
    "get",
    "names",
    "onnx_logits",
    "train",
]

DEMO_DIR = Path(__file__).resolve().parent.parent / "compressor" / "demo"
DEMO_SAMPLES = 512
CACHE = Path(__file__).resolve().parent / "cache"
RESULTS = Path(__file__).resolve().parent / "results" / "zoo.md"

# Kept for `python -m benchmarks.zoo demo` and older imports.
build_demo = models.build_demo
MODELS: dict[str, Callable[[], nn.Module]] = {"demo": build_demo}


@dataclass(frozen=True)
class ZooModel:
    """One cached zoo model: its ONNX file, data sets and fp32 reference accuracy."""

    name: str
    onnx_path: Path  # the dynamo export (opset 18) unless exporter="legacy" (opset 17)
    calib_path: Path  # .npz with 'x' (and 'y' where true labels exist)
    eval_path: Path  # .npz with 'x', 'y', optional 'margin' (fp32 top-1 minus top-2 probability)
    fp32_top1: float | None  # on eval_path, measured with onnxruntime
    true_labels: bool  # False where 'y' are the fp32 model's own predictions
    input_shape: tuple[int, ...]  # per sample, e.g. (1, 28, 28)
    torch_state: Path | None  # state_dict (torch.load(..., weights_only=True)) for models we define


def names() -> list[str]:
    """Every zoo model name, ``demo`` first."""
    return ["demo", *FMNIST_EPOCHS, *IMAGENET]


def build_torch(name: str) -> nn.Module:
    """The architecture of ``name`` with fresh (untrained) weights, for loading ``torch_state``."""
    _check_name(name)
    return models.ARCHITECTURES[name]()


def get(name: str, exporter: str = "dynamo", build: bool = True) -> ZooModel:
    """Return the cached model ``name``, building it (seed 0) on first use.

    Raises:
        KeyError: unknown name.
        ValueError: ``exporter`` is not ``"dynamo"`` or ``"legacy"``, or the model has no such export.
        FileNotFoundError: ``build=False`` and the model is not cached.
    """
    _check_name(name)
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}: use one of {sorted(EXPORTERS)}")
    if name == "demo":
        return _demo_model(exporter)
    meta = read_meta(name)
    if meta is None:
        if not build:
            raise FileNotFoundError(
                f"zoo model {name!r} is not cached in {CACHE}: run `python -m benchmarks.zoo build {name}`"
            )
        meta = build_model(name, seed=0, force=False)
    return _zoo_model(name, exporter, meta)


def _check_name(name: str) -> None:
    if name not in names():
        raise KeyError(f"unknown zoo model {name!r}: choose from {', '.join(names())}")


def read_meta(name: str) -> dict | None:
    """The cached ``meta.json`` of ``name``, or None when it is not built."""
    path = CACHE / name / "meta.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _zoo_model(name: str, exporter: str, meta: dict) -> ZooModel:
    folder = CACHE / name
    if exporter not in meta["exports"]:
        raise ValueError(f"zoo model {name!r} has only the {', '.join(meta['exports'])} export")
    export_meta = meta["exports"][exporter]
    return ZooModel(
        name=name,
        onnx_path=folder / export_meta["file"],
        calib_path=folder / "calib.npz",
        eval_path=folder / "eval.npz",
        fp32_top1=export_meta["eval_top1"],
        true_labels=meta["true_labels"],
        input_shape=tuple(meta["input_shape"]),
        torch_state=folder / meta["torch_state"] if meta["torch_state"] else None,
    )


def _demo_model(exporter: str) -> ZooModel:
    if exporter != "dynamo":
        raise ValueError("the demo model ships only the dynamo export")
    npz = DEMO_DIR / "demo.npz"
    return ZooModel("demo", DEMO_DIR / "demo.onnx", npz, npz, _demo_top1(), True, (1, 28, 28), None)


@functools.lru_cache(maxsize=1)
def _demo_top1() -> float:
    with np.load(DEMO_DIR / "demo.npz") as data:
        return float((onnx_logits(DEMO_DIR / "demo.onnx", data["x"]).argmax(1) == data["y"]).mean())


# --- building and caching ---------------------------------------------------------------


@contextmanager
def _locked(name: str) -> Iterator[None]:
    """Hold an exclusive file lock for building ``name`` (concurrent `get` calls wait)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_model(name: str, seed: int = 0, force: bool = False, log: Callable[[str], None] = print) -> dict:
    """Build ``name`` into ``CACHE/<name>`` unless cached with this ``seed``; return its meta.

    The model is built in a scratch folder which then replaces the cached one, so readers
    never see a half-written model.
    """
    _check_name(name)
    if name == "demo":
        raise ValueError("the demo model ships with the package: rebuild it with `python -m benchmarks.zoo demo`")
    with _locked(name):
        meta = read_meta(name)
        if meta is not None and meta["seed"] == seed and not force:
            return meta
        scratch = CACHE / f".{name}.building"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        start = time.perf_counter()
        builder = build_fmnist if name in FMNIST_EPOCHS else build_imagenet
        meta = {"name": name, "seed": seed, **builder(name, seed, scratch, lambda msg: log(f"[{name}] {msg}"))}
        meta["build_s"] = round(time.perf_counter() - start, 1)
        (scratch / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        final, trash = CACHE / name, CACHE / f".{name}.old"
        shutil.rmtree(trash, ignore_errors=True)
        if final.exists():
            final.rename(trash)
        scratch.rename(final)
        shutil.rmtree(trash, ignore_errors=True)
        log(f"[{name}] built in {meta['build_s']:.0f} s")
        return meta


# --- demo package -----------------------------------------------------------------------


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


# --- results table ----------------------------------------------------------------------


def _row(name: str) -> tuple[str, str, str] | None:
    """(table row, dynamo op types, legacy op-type difference) for a cached model, else None."""
    meta = read_meta(name)
    if name == "demo":
        test_images, test_labels = load_fashion_mnist("test")
        top1 = (onnx_logits(DEMO_DIR / "demo.onnx", to_input(test_images)).argmax(1) == test_labels).mean()
        path, meta = DEMO_DIR / "demo.onnx", {"n_calib": DEMO_SAMPLES, "n_eval": DEMO_SAMPLES}
        accuracy, timing, ops, legacy = f"{top1:.4f}", "shipped", op_counts(path), None
    elif meta is None:
        return None
    else:
        path, exports = CACHE / name / "model.onnx", meta["exports"]
        accuracy = f"{exports['dynamo']['test_top1']:.4f}" if meta["true_labels"] else "n/a (labels = fp32)"
        timing, ops = _timing(name, meta), Counter(exports["dynamo"]["ops"])
        legacy = Counter(exports["legacy"]["ops"]) if "legacy" in exports else None
    cost, size = compute_cost(onnx.load(path)), path.stat().st_size / 2**20
    row = (
        f"| {name} | {cost.params / 1e6:.3f} M | {cost.macs / 1e6:.1f} M | {size:.2f} MiB | {accuracy} | {timing} "
        f"| {meta['n_calib']} / {meta['n_eval']} |"
    )
    dynamo_ops = ", ".join(f"{op} {n}" for op, n in sorted(ops.items()))
    if legacy is None:
        return row, dynamo_ops, "— (shipped as is)" if name == "demo" else "— (dynamo export only)"
    diff = [f"{op} {ops[op]}→{legacy[op]}" for op in sorted(ops | legacy) if ops[op] != legacy[op]]
    return row, dynamo_ops, "; ".join(diff) or "same"


def _timing(name: str, meta: dict) -> str:
    if "epochs" in meta:
        return f"{meta['train_s'] / 60:.1f} min, {meta['epochs']} epochs"
    if meta["torch_state"] is None:
        return f"pretrained (load {meta['train_s']:.0f} s)"
    return f"random; BN + classifier calibration {meta['train_s']:.0f} s"


def write_report(path: Path = RESULTS) -> Path:
    """Write the zoo table (params, MACs, size, accuracy, train time, op types) for cached models."""
    rows = {name: row for name in names() if (row := _row(name)) is not None}
    lines = [
        "# Model zoo",
        "",
        "Written by `python -m benchmarks.zoo build`. Params and MACs (batch 1) from",
        "`compressor.metrics.compute_cost` on the dynamo export (opset 18; BatchNorm folded by the exporter).",
        "Top-1: fp32, onnxruntime, full 10k Fashion-MNIST test set (eval set: its first 2000 images; calib: 512",
        "seeded train images). ImageNet-style models (224x224 RGB; EfficientNet-Lite0 inputs (x - 127.5) / 127.5,",
        "ResNets (x / 255 - mean) / std) are evaluated on `skimage.data` photo crops labelled by their own fp32",
        "predictions. The 224x224 ResNets have seeded random weights with BatchNorm statistics and classifier",
        "calibrated on photo crops. Train time: wall clock on 2 CPU cores shared with other benchmark jobs",
        "(on idle cores an epoch takes about 25-40 s).",
        "",
        "| model | params | MACs | ONNX size | fp32 top-1 | train time | calib / eval |",
        "|---|---|---|---|---|---|---|",
        *(row[0] for row in rows.values()),
        "",
        "Op types (count) of the dynamo export, and where the legacy TorchScript export (opset 17) differs:",
        "",
        "| model | dynamo (opset 18) | legacy (opset 17): dynamo→legacy |",
        "|---|---|---|",
        *(f"| {name} | {row[1]} | {row[2]} |" for name, row in rows.items()),
    ]
    for name in IMAGENET:
        if (meta := read_meta(name)) is not None:
            lines.append(
                f"\n{name}: {meta['confident']} of {meta['n_eval']} eval crops are confident (fp32 top-1 minus "
                f"top-2 probability >= {CONFIDENT_MARGIN}); {meta['distinct_labels']} distinct fp32 classes."
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def list_lines() -> list[str]:
    """One line per zoo model: name, cached?, fp32 top-1 on its eval set."""
    lines = []
    for name in names():
        meta = read_meta(name)
        if name == "demo":
            lines.append(f"{name:20s} packaged  eval top-1 {_demo_top1():.4f}")
        elif meta is None:
            lines.append(f"{name:20s} -")
        else:
            top1 = meta["exports"]["dynamo"].get("test_top1")
            label = f"test top-1 {top1:.4f}" if top1 is not None else "labels = fp32 predictions"
            lines.append(f"{name:20s} cached    {label} (seed {meta['seed']}, {', '.join(meta['exports'])})")
    return lines


# --- command line -----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Command line: ``build [NAMES...]``, ``list`` or ``demo``; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.zoo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build and cache zoo models, then write results/zoo.md")
    build.add_argument("names", nargs="*", metavar="NAME", help=f"default: all of {', '.join(names()[1:])}")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--force", action="store_true", help="rebuild even if cached with this seed")
    sub.add_parser("list", help="name, cached?, fp32 top-1")
    demo = sub.add_parser("demo", help="rebuild the demo model shipped in compressor/demo")
    demo.add_argument("--epochs", type=int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        build_demo_package(args.epochs, args.seed)
    elif args.command == "list":
        print("\n".join(list_lines()))
    else:
        if unknown := sorted(set(args.names) - set(names()[1:])):
            parser.error(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(names()[1:])}")
        for name in args.names or names()[1:]:
            build_model(name, args.seed, args.force)
        print(f"wrote {write_report()}")


if __name__ == "__main__":
    main()
