"""The int8 benchmark on its own: ours vs onnxruntime's quantize_static (5 settings) vs NNCF.

    python -m benchmarks.int8            # the default zoo (Fashion-MNIST models and ResNet-18 at 224)
    python -m benchmarks.int8 --slow     # adds EfficientNet-Lite0 and ResNet-50 at 224
    python -m benchmarks.int8 --models demo resnet18_224

Writes ``benchmarks/results/int8.md`` and its plots; the options are those of
``python -m benchmarks.run`` (which runs every table).
"""

from __future__ import annotations

import sys

from benchmarks import run


def main(argv: list[str] | None = None) -> None:
    """Run ``benchmarks.run`` restricted to the int8 table."""
    run.main([*(sys.argv[1:] if argv is None else argv), "--only", "int8"])


if __name__ == "__main__":
    main()
