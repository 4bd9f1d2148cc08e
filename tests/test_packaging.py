"""`passes/` and `backends/` install as `compressor.passes` / `compressor.backends`, from a wheel and editable."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import compressor.backends
import compressor.passes

REPO = Path(__file__).resolve().parents[1]

PROBE = (
    "import compressor, compressor.passes, compressor.backends, compressor.cli;"
    "from compressor.passes import FoldBatchNorm;"
    "from compressor.backends import get_backend;"
    "from importlib import resources;"
    "print(compressor.passes.__file__);"
    "print(compressor.backends.__file__);"
    "print(resources.files('compressor.demo').joinpath('demo.onnx').is_file())"
)


def test_editable_checkout_maps_the_top_level_folders() -> None:
    assert Path(compressor.passes.__file__).parent == REPO / "passes"
    assert Path(compressor.backends.__file__).parent == REPO / "backends"


@pytest.mark.slow
def test_wheel_installs_and_imports(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("compressor-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "compressor/passes/fold_batchnorm.py" in names
    assert "compressor/backends/onnxruntime_cpu.py" in names
    assert "compressor/demo/demo.onnx" in names
    assert not any(name.startswith(("passes/", "backends/")) for name in names)

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True
    )
    # Run outside the checkout with the wheel's folder first on the path.
    probe = subprocess.run(
        [sys.executable, "-c", PROBE],
        check=True,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    )
    passes_file, backends_file, has_demo = probe.stdout.split()
    assert Path(passes_file).is_relative_to(target / "compressor" / "passes")
    assert Path(backends_file).is_relative_to(target / "compressor" / "backends")
    assert has_demo == "True"
