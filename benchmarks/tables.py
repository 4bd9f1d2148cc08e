"""Markdown tables and PNG plots of benchmark `Row`s."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path

import onnxruntime as ort

from benchmarks.harness import THREADS, Row


def _pct(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{100 * value:.{digits}f}%"


def _num(value: float | None, fmt: str, suffix: str = "") -> str:
    if value is None:
        return "—"
    if value == float("inf"):
        return "exact"
    return f"{value:{fmt}}{suffix}"


COLUMNS: dict[str, tuple[str, Callable[[Row], str]]] = {
    "model": ("model", lambda r: r.model),
    "recipe": ("method", lambda r: r.recipe),
    "top1_fp32": ("top-1 fp32", lambda r: _pct(r.top1_fp32)),
    "top1": ("top-1", lambda r: _pct(r.top1)),
    "drop": ("loss (pt)", lambda r: _num(r.drop_pt, "+.2f")),
    "agreement": ("agree", lambda r: _pct(r.agreement, 1)),
    "agreement_confident": ("agree (margin≥0.1)", lambda r: _pct(r.agreement_confident, 1)),
    "sqnr": ("SQNR dB", lambda r: _num(r.sqnr_db, ".1f")),
    "size_ratio": ("× smaller", lambda r: _num(r.size_ratio, ".2f", "×")),
    "macs_removed": ("MACs removed", lambda r: _pct(r.macs_removed, 1)),
    "params_fraction": ("params kept", lambda r: _pct(r.params_fraction, 1)),
    "speedup_b1": ("speed-up b1", lambda r: _num(r.speedup(1), ".2f", "×")),
    "speedup_b8": ("speed-up b8", lambda r: _num(r.speedup(8), ".2f", "×")),
    "speedup_b64": ("speed-up b64", lambda r: _num(r.speedup(64), ".2f", "×")),
    "speedup_spinning": ("speed-up b1, spinning on", lambda r: _num(r.speedup_spinning, ".2f", "×")),
    "wall": ("wall s", lambda r: _num(r.wall_s, ".1f")),
    "rss": ("peak RSS MB", lambda r: _num(r.peak_rss_mb, ".0f")),
    "base_rss": ("RSS at start MB", lambda r: _num(r.base_rss_mb, ".0f")),
    "calib": ("calib samples", lambda r: _num(r.calib_samples, "d")),
    "note": ("note", lambda r: r.note.replace("|", "\\|")),
}


def machine_line() -> str:
    """CPU model, thread count, onnxruntime version and date, for under a table."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return (
        f"Machine: {cpu}, {os.cpu_count()} cores, {THREADS} intra-op threads; onnxruntime {ort.__version__}; "
        f"{date.today().isoformat()}."
    )


def table_lines(rows: Sequence[Row], columns: Sequence[str]) -> list[str]:
    """A Markdown table (header, separator, one line per row)."""
    headers = [COLUMNS[c][0] for c in columns]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(COLUMNS[c][1](row) for c in columns) + " |" for row in rows]
    return lines


def write_table(
    rows: Sequence[Row], path: Path, title: str, columns: Sequence[str], *, intro: Sequence[str] = ()
) -> Path:
    """Write ``# title``, optional intro lines, the machine line and the table to ``path``."""
    lines = [f"# {title}", "", *intro, *([""] if intro else []), machine_line(), "", *table_lines(rows, columns), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def plot(rows: Sequence[Row], path: Path) -> list[Path]:
    """Write ``<stem>-size.png`` and ``<stem>-speed.png``: loss vs size ratio and vs speed-up (batch 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for suffix, xlabel, xvalue in (
        ("size", "size reduction (fp32 / compressed, ×)", lambda r: r.size_ratio),
        ("speed", "latency speed-up at batch 1 (fp32 / compressed, ×)", lambda r: r.speedup(1)),
    ):
        points = [(xvalue(r), r.drop_pt, r) for r in rows if r.ok and xvalue(r) is not None and r.drop_pt is not None]
        fig, ax = plt.subplots(figsize=(9, 6))
        methods = sorted({r.recipe for _, _, r in points})
        colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
        for x, y, r in points:
            ax.scatter(x, y, color=colors[r.recipe], marker="o" if r.family == "peer" else "*", s=50)
            ax.annotate(r.model, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        families = {r.recipe: r.family for _, _, r in points}
        for m in methods:
            ax.scatter([], [], color=colors[m], marker="o" if families[m] == "peer" else "*", label=m)
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 loss (pt; 100 − agreement for fp32-labelled models)")
        ax.set_title(f"{path.stem}: one point per (method, model)")
        if methods:
            ax.legend(fontsize=7, loc="best")
        out = path.with_name(f"{path.stem}-{suffix}.png")
        fig.tight_layout()
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written
