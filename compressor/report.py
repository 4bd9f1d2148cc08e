"""The fp32-vs-compressed summary: measured once, printed as a table, saved as JSON."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from compressor.files import atomic_write_bytes


@dataclass(frozen=True)
class Row:
    """One line of the summary. ``kind`` decides formatting and how the ratio reads."""

    label: str
    fp32: float | None
    compressed: float | None
    kind: str  # "bytes", "count", "ms", "fraction", "db"

    @property
    def ratio(self) -> float | None:
        """fp32/compressed for costs (higher is better); compressed-fp32 in points for fractions."""
        if self.fp32 is None or self.compressed is None:
            return None
        if self.kind == "fraction":
            return 100.0 * (self.compressed - self.fp32)
        if self.kind == "db":
            return None
        return self.fp32 / self.compressed if self.compressed else None

    def cells(self) -> tuple[str, str, str, str]:
        ratio = self.ratio
        if ratio is None:
            ratio_text = "—"
        elif self.kind == "fraction":
            ratio_text = f"{ratio:+.2f} pt"
        else:
            ratio_text = f"{ratio:.2f}×"
        return self.label, _format(self.fp32, self.kind), _format(self.compressed, self.kind), ratio_text


def _format(value: float | None, kind: str) -> str:
    if value is None:
        return "n/a"
    if kind == "bytes":
        return f"{value / 1e6:.3f} MB" if value >= 1e5 else f"{value / 1e3:.1f} kB"
    if kind == "count":
        return f"{value / 1e6:.2f} M" if value >= 1e4 else f"{value:.0f}"
    if kind == "ms":
        return f"{value:.3f} ms"
    if kind == "fraction":
        return f"{100 * value:.2f}%"
    if kind == "db":
        return "exact" if math.isinf(value) and value > 0 else f"{value:.1f} dB"
    return f"{value:g}"


@dataclass
class Report:
    """Everything a run measured: summary rows, pass records and run settings."""

    model: str
    target: str
    backend: str
    rows: list[Row] = field(default_factory=list)
    passes: list[dict[str, Any]] = field(default_factory=list)
    evaluation: dict[str, Any] = field(default_factory=dict)
    output: str | None = None
    kept_float: dict[str, str] = field(default_factory=dict)  # node -> why it was not quantized
    lowering: dict[str, list[str]] = field(default_factory=dict)  # backend rewrite -> nodes it applied to
    steps: dict[str, float] = field(default_factory=dict)  # long step inside or after the passes -> seconds
    notes: list[str] = field(default_factory=list)  # what was not measured, and why
    recipe: dict[str, Any] = field(default_factory=dict)  # the recipe that ran (`Recipe.to_dict`), choices pinned

    def table(self) -> str:
        """The summary as a Markdown table."""
        lines = ["| | fp32 | compressed | ratio |", "|---|---|---|---|"]
        lines += ["| " + " | ".join(row.cells()) + " |" for row in self.rows]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form; infinities become strings so the JSON stays standard."""
        summary = {
            row.label: {"fp32": row.fp32, "compressed": row.compressed, "ratio": row.ratio, "kind": row.kind}
            for row in self.rows
        }
        data = {
            "model": self.model,
            "target": self.target,
            "backend": self.backend,
            "output": self.output,
            "evaluation": self.evaluation,
            "summary": summary,
            "passes": self.passes,
            "kept_float": self.kept_float,
            "lowering": self.lowering,
            "steps": self.steps,
            "notes": self.notes,
            "recipe": self.recipe,
        }
        return _finite(data)

    def write_json(self, path: str | os.PathLike) -> None:
        """Write the report as JSON, atomically."""
        atomic_write_bytes(path, (json.dumps(self.as_dict(), indent=2) + "\n").encode())


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
