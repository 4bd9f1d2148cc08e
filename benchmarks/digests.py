"""Digests of the fp32 and int8 lowerings of the demo and every cached zoo model: proof a refactor changed nothing.

The timing-based steps are switched off (the latency guard, and the AMX conv-kernel
chooser, by reporting no AMX), so two runs of the same code agree byte for byte.
Run it with the code before and after a change, then compare::

    python -m benchmarks.digests write before.json     # on the old commit (e.g. a git worktree)
    python -m benchmarks.digests write after.json
    python -m benchmarks.digests compare before.json after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

CACHE = Path(__file__).resolve().parent / "cache"
DEMO = Path(__file__).resolve().parent.parent / "compressor" / "demo"


def models() -> dict[str, tuple[Path, Path]]:
    """Name -> (model file, calibration file): the demo, then each cached zoo export."""
    found = {"demo": (DEMO / "demo.onnx", DEMO / "demo.npz")}
    for folder in sorted(CACHE.glob("*")):
        for file in ("model.onnx", "model_legacy.onnx"):
            if (folder / file).is_file() and (folder / "calib.npz").is_file():
                found[f"{folder.name}/{file}"] = (folder / file, folder / "calib.npz")
    return found


def write(path: Path) -> None:
    import compressor.backends.onnxruntime_cpu as cpu
    from compressor import compress

    cpu.cpu_has_amx = lambda: False  # profiling picks kernels by timing: off, so runs agree
    digests = {}
    for name, (model, calib) in models().items():
        for target in ("fp32", "int8"):
            result = compress(model, target, calib=calib if target == "int8" else None, latency_guard=False,
                              measure_latency=False, measure_fidelity=False, progress=False)  # fmt: skip
            digests[f"{name}:{target}"] = hashlib.sha256(
                result.lowered.SerializeToString(deterministic=True)
            ).hexdigest()
            print(f"{name}:{target} {digests[f'{name}:{target}'][:16]}", flush=True)
    path.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")


def compare(before: Path, after: Path) -> int:
    old, new = json.loads(before.read_text()), json.loads(after.read_text())
    differ = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    print(f"{len(old.keys() & new.keys())} lowerings in both, {len(differ)} differ" + (f": {differ}" if differ else ""))
    return 1 if differ else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.digests", description=__doc__.split("\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    verbs.add_parser("write").add_argument("out", type=Path)
    both = verbs.add_parser("compare")
    both.add_argument("before", type=Path)
    both.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    if args.verb == "write":
        write(args.out)
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
