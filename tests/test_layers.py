"""The import contract of DESIGN.md §2: core <- passes <- backends <- face, checked by import-linter.

`passes/` and `backends/` install as `compressor.passes` and `compressor.backends`
(setuptools ``package-dir``), which import-linter's graph builder cannot follow in
an editable checkout. So the tests copy the sources into the installed layout, the
way a wheel holds them, and run ``lint-imports`` on that copy with the contract
from ``pyproject.toml``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CONTRACT = PYPROJECT["tool"]["importlinter"]["contracts"][0]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def installed_layout(folder: Path) -> Path:
    """The package's sources under ``folder`` as installed (``compressor/passes/...``); returns ``folder``."""
    mapping = PYPROJECT["tool"]["setuptools"]["package-dir"]
    for package in PYPROJECT["tool"]["setuptools"]["packages"]:
        parent = next(p for p in sorted(mapping, key=len, reverse=True) if package == p or package.startswith(p + "."))
        source = REPO / mapping[parent] / Path(*package.split(".")[len(parent.split(".")) :])
        target = folder / Path(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for file in source.glob("*.py"):
            shutil.copy2(file, target / file.name)
    shutil.copy2(REPO / "pyproject.toml", folder / "pyproject.toml")
    return folder


def lint_imports(folder: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(folder)}
    return subprocess.run(
        [str(LINT_IMPORTS), "pyproject.toml", "--no-cache"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def layer_modules() -> set[str]:
    modules: set[str] = set()
    for layer in CONTRACT["layers"]:
        modules |= {name.strip() for name in layer.replace("|", ":").split(":")}
    return modules


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return installed_layout(tmp_path_factory.mktemp("installed"))


def test_every_module_belongs_to_a_layer(tree: Path) -> None:
    layers = layer_modules()
    unplaced = []
    for file in (tree / "compressor").rglob("*.py"):
        parts = file.relative_to(tree).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if module != "compressor" and not any(module == m or module.startswith(m + ".") for m in layers):
            unplaced.append(module)
    assert not unplaced, f"add these modules to a layer in pyproject.toml [tool.importlinter]: {unplaced}"


def test_imports_follow_the_layers(tree: Path) -> None:
    result = lint_imports(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_an_import_against_the_layers_is_caught(tmp_path: Path) -> None:
    tree = installed_layout(tmp_path)
    metrics = tree / "compressor" / "metrics.py"
    metrics.write_text(metrics.read_text() + "\nfrom compressor.backends import base  # noqa: E402\n")
    result = lint_imports(tree)
    assert result.returncode != 0
    assert "compressor.metrics -> compressor.backends" in result.stdout, result.stdout
