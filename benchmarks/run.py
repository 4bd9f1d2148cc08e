"""Run the side-by-side benchmarks and write ``benchmarks/results/*.md`` and plots.

    python -m benchmarks.run                      # int8, prune, lowrank on the cached default models
    python -m benchmarks.run --fast               # Fashion-MNIST models only, 500 eval samples, 10 runs
    python -m benchmarks.run --slow               # adds efficientnet_lite0, resnet50_224 and scale.md
    python -m benchmarks.run --only scale         # only the calibration-size sweep (resnet18_224, resnet50_224)
    python -m benchmarks.run --models demo resnet --only int8

Models that are not cached yet are skipped with a note; build them with
``python -m benchmarks.zoo build``. Every recipe runs in its own child process.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks import harness, peers
from benchmarks.harness import Method, Row
from benchmarks.readme import HEADLINE_END, HEADLINE_START, RESULTS
from benchmarks.tables import plot, write_table
from benchmarks.zoo import ZooModel, get

FMNIST = ("demo", "resnet", "mobilenetv2", "squeezenet", "shufflenetv2", "vgg")
DEFAULT_MODELS = (*FMNIST, "resnet18_224")
SLOW_MODELS = ("efficientnet_lite0", "resnet50_224")
# Random weights (benchmarks/models.py): they measure speed and agreement with fp32, not accuracy, so the
# headline's loss columns leave them out and report their worst agreement in a column of its own.
LATENCY_ONLY = ("resnet18_224", "resnet50_224")
# Calibration-set sizes per model for scale.md: the zoo's own set, up to our default of 256 samples, and beyond.
SCALE_SWEEP = {"resnet18_224": (64, 128, 256), "resnet50_224": (512,)}
SCALE_REPEATS = 3  # compiles per row in scale.md: one wall time varies by about ±5% here
LARGE_INPUT = 100_000  # input elements per sample above which heavy recipes need --slow

OURS_FP32 = Method("ours fp32 (reference)", "ours", "fp32", peers.ours_fp32)
OURS_INT8 = Method("ours int8", "ours", "int8", peers.ours_int8)
OURS_INT8_UNSEARCHED = Method(
    "ours int8, no search, no guard (--min-sqnr 0 --keep-slow-int8)", "ours", "int8", peers.ours_int8_unsearched
)
OURS_INT8_ADAROUND = Method("ours int8, --rounding adaround", "ours", "int8", peers.ours_int8_adaround, heavy=True)
ORT_DEFAULTS = Method("ORT quantize_static (defaults)", "peer", "int8", peers.ort_defaults)
ORT_BEST = Method("ORT best flags (u8/s8, per-channel, reduce_range, pre-process)", "peer", "int8", peers.ort_best)
INT8 = [
    OURS_FP32,
    OURS_INT8,
    OURS_INT8_UNSEARCHED,
    OURS_INT8_ADAROUND,
    ORT_DEFAULTS,
    Method("ORT defaults + quant_pre_process", "peer", "int8", peers.ort_defaults_preprocessed),
    ORT_BEST,
    Method("ORT best flags, Entropy calibration", "peer", "int8", peers.ort_entropy, heavy=True),
    Method("ORT best flags, Percentile calibration", "peer", "int8", peers.ort_percentile, heavy=True),
    Method("NNCF quantize (default preset)", "peer", "int8", peers.nncf_default, heavy=True),
]
LOWRANK = [
    Method("truncated SVD, Gemm/MatMul, ~20% params", "peer", "lowrank", peers.svd_gemm),
    Method("truncated SVD, Gemm/MatMul + Conv, ~20% params", "peer", "lowrank", peers.svd_gemm_conv),
]
SCALE = [ORT_DEFAULTS, ORT_BEST, OURS_INT8, OURS_INT8_UNSEARCHED]

BASE_COLUMNS = ["model", "recipe", "top1_fp32", "top1", "drop", "agreement"]
SPEED_COLUMNS = ["size_ratio", "speedup_b1", "speedup_b8", "wall"]
COLUMNS = {
    "int8": [
        *BASE_COLUMNS,
        "agreement_confident",
        "sqnr",
        *SPEED_COLUMNS[:3],
        "speedup_spinning",
        "wall",
        "rss",
        "note",
    ],
    "prune": [*BASE_COLUMNS, "sqnr", "macs_removed", "params_fraction", *SPEED_COLUMNS[:3], "speedup_b64", "wall",
              "note"],
    "lowrank": [*BASE_COLUMNS, "sqnr", "params_fraction", "macs_removed", *SPEED_COLUMNS, "note"],
    "rounding": [],  # the int8 columns, set below
    "scale": ["model", "recipe", "calib", "wall", "rss", "base_rss", "agreement", "sqnr", "size_ratio", "note"],
}
COLUMNS["rounding"] = COLUMNS["int8"]
LEGEND = (
    "loss (pt): fp32 top-1 minus compressed top-1 on the eval set, in points; for models whose labels are the fp32 "
    "predictions (224×224 ones) it is 100 − agreement. agree: top-1 agreement with fp32; agree (margin≥0.1): on "
    "samples whose fp32 top-1/top-2 probability margin is ≥ 0.1. SQNR: logits vs fp32. × smaller: size on disk, "
    "fp32 / compressed. speed-up: fp32 / compressed median latency (at least 20 runs; fast models get about 1 s of "
    "runs, at most 500), onnxruntime CPU, 2 intra-op threads, both "
    "sessions alive with spinning off, A/B interleaved. speed-up b1, spinning on: onnxruntime's default session "
    "options (worker threads spin between ops, as deployed out of the box), each session timed with no other alive: "
    "built, warmed up with 3 runs, timed, dropped, in 3 alternating rounds. wall s / peak RSS MB: the recipe alone, "
    "in a child process (peak RSS = VmHWM, includes the interpreter and imported libraries); like the peers' "
    "recipes, ours builds the model only: its report's own latency and accuracy measurements are off "
    "(`--no-latency --no-fidelity`), since this table measures every row itself."
)


@dataclass(frozen=True)
class Table:
    """One results file: its recipes, the text under the title, and the models it covers."""

    key: str
    title: str
    recipes: list[Method]
    notes: list[str]


def load_models(names: Sequence[str]) -> tuple[list[ZooModel], list[str]]:
    """The cached zoo models among ``names``, and a note for each one skipped."""
    found, skipped = [], []
    for name in names:
        try:
            found.append(get(name, build=False))
        except (FileNotFoundError, ValueError, KeyError) as exc:
            skipped.append(name)
            print(f"skip {name}: {exc}")
    return found, skipped


def run_rows(
    models: Sequence[ZooModel],
    recipes: Sequence[Method],
    runs: int,
    eval_limit: int | None,
    slow: bool = True,
    repeats: int = 1,
) -> list[Row]:
    """Measure every recipe on every model, one child process at a time (``repeats`` per recipe, see `measure`).

    Without ``slow``, heavy recipes are not run on large-input models; their rows say so.
    """
    rows = []
    for model in models:
        for recipe in recipes:
            start = time.perf_counter()
            if recipe.heavy and not slow and math.prod(model.input_shape) > LARGE_INPUT:
                note = "not run: slow and memory-hungry at 224×224 (add --slow)"
                row = Row(model.name, recipe.name, recipe.family, recipe.kind, note=note)
            else:
                row = harness.measure(model, recipe, runs=runs, eval_limit=eval_limit, repeats=repeats)
            drop = "—" if row.drop_pt is None else f"{row.drop_pt:+.2f} pt"
            took = time.perf_counter() - start
            print(f"{model.name:>18} | {recipe.name:<58} | {drop:>10} | {took:5.0f} s | {row.note}", flush=True)
            rows.append(row)
    return rows


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _fmt(kind: str, value: float | None) -> str:
    if value is None:
        return "—"
    formats = {"pt": "{:+.2f}", "x": "{:.2f}×", "%": "{:.1%}", "s": "{:.1f}", "mb": "{:.0f}"}
    return formats[kind].format(value)


SUMMARY: dict[str, tuple[str, str, Callable[[list[Row]], float | None]]] = {
    "median_loss": ("median loss (pt)", "pt", lambda ok: _median([r.drop_pt for r in _scored(ok)])),
    "size": ("median × smaller", "x", lambda ok: _median([r.size_ratio for r in ok])),
    "macs": ("median MACs removed", "%", lambda ok: _median([r.macs_removed for r in ok])),
    "params": ("median params kept", "%", lambda ok: _median([r.params_fraction for r in ok])),
    "b1": ("median speed-up b1", "x", lambda ok: _median([r.speedup(1) for r in ok])),
    "b8": ("median speed-up b8", "x", lambda ok: _median([r.speedup(8) for r in ok])),
    "b64": ("median speed-up b64", "x", lambda ok: _median([r.speedup(64) for r in ok])),
    "spinning": ("median speed-up b1, spinning on", "x", lambda ok: _median([r.speedup_spinning for r in ok])),
    "wall": ("median wall s", "s", lambda ok: _median([r.wall_s for r in ok])),
    "rss": ("max peak RSS MB", "mb", lambda ok: max((r.peak_rss_mb for r in ok if r.peak_rss_mb), default=None)),
}
SUMMARY_KEYS = {
    "int8": ["median_loss", "size", "b1", "b8", "spinning", "wall", "rss"],
    "prune": ["median_loss", "macs", "params", "b1", "b8", "b64"],
    "lowrank": ["median_loss", "params", "macs", "size", "b1"],
    "rounding": ["median_loss", "size", "b1", "b8", "spinning", "wall", "rss"],
}


def _scored(ok: Sequence[Row]) -> list[Row]:
    """The rows whose loss says something about accuracy: trained models only."""
    return [r for r in ok if r.drop_pt is not None and r.model not in LATENCY_ONLY]


def summary_lines(rows: Sequence[Row], recipes: Sequence[Method], keys: Sequence[str]) -> list[str]:
    """Per-method headline: models measured, worst loss on a trained model, medians over models.

    Latency-only (random-weight) models count in the speed and size medians; their worst agreement with
    fp32 gets the last column, so the loss columns say what the accuracy is.
    """
    latency_only = sorted({r.model for r in rows if r.model in LATENCY_ONLY})
    headers = ["method", "models ok", "worst loss (pt), trained models", *(SUMMARY[k][0] for k in keys)]
    if latency_only:
        headers.append(f"worst agreement, random weights ({', '.join(latency_only)})")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for recipe in recipes:
        mine = [r for r in rows if r.recipe == recipe.name]
        ok = [r for r in mine if r.ok]
        worst = max(_scored(ok), key=lambda r: r.drop_pt, default=None)
        worst_text = f"{_fmt('pt', worst.drop_pt)} ({worst.model})" if worst else "—"
        if not ok and mine:
            worst_text = mine[0].note.replace("|", "\\|")[:100]
        cells = [recipe.name, f"{len(ok)}/{len(mine)}", worst_text]
        cells += [_fmt(SUMMARY[k][1], SUMMARY[k][2](ok)) for k in keys]
        if latency_only:
            agreeing = [r for r in ok if r.model in LATENCY_ONLY and r.agreement is not None]
            least = min(agreeing, key=lambda r: r.agreement, default=None)
            cells.append(f"{_fmt('%', least.agreement)} ({least.model})" if least else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_results(table: Table, rows: list[Row], skipped: list[str]) -> None:
    """Write ``results/<key>.md`` (headline summary, notes, full table) and its plots."""
    summary = scale_lines(rows) if table.key == "scale" else summary_lines(rows, table.recipes, SUMMARY_KEYS[table.key])
    intro = ["## Headline", "", HEADLINE_START, *summary, HEADLINE_END, ""]
    intro += [*table.notes, "", LEGEND]
    if skipped:
        intro += ["", f"Not cached when this ran, so skipped: {', '.join(skipped)} (`python -m benchmarks.zoo build`)."]
    intro += ["", "## All rows"]
    path = write_table(rows, RESULTS / f"{table.key}.md", table.title, COLUMNS[table.key], intro=intro)
    if table.key != "scale":
        plots = plot(rows, RESULTS / table.key)
        with path.open("a") as f:
            f.write("\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n")
    print(f"wrote {path}")


def with_calib_samples(model: ZooModel, count: int, folder: Path) -> ZooModel:
    """``model`` with a calibration file of exactly ``count`` samples.

    The first ones of its own set; where that holds fewer, more photo crops drawn as the zoo draws
    its calibration crops (same seed), so the cached crops come first and the rest continue them.
    """
    with np.load(model.calib_path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    if len(arrays["x"]) < count:
        from benchmarks.zoo_build import IMAGENET, photo_crops

        arrays = {"x": IMAGENET[model.name].preprocess(photo_crops(count, [0, 1]))}
    path = folder / f"{model.name}-calib{count}.npz"
    np.savez(path, **{k: v[:count] for k, v in arrays.items()})
    return dataclasses.replace(model, calib_path=path)


def run_scale(runs: int) -> None:
    """Compile cost against calibration-set size: each `SCALE_SWEEP` model and size, every `SCALE` recipe."""
    models, skipped = load_models(list(SCALE_SWEEP))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for model in models:
            for count in SCALE_SWEEP[model.name]:
                sized = [with_calib_samples(model, count, Path(tmp))]
                rows += run_rows(sized, SCALE, runs=runs, eval_limit=256, repeats=SCALE_REPEATS)
    notes = [
        "int8 of the random-weight ResNets at 224×224, calibrated on photo crops (one sample per call for "
        "onnxruntime), at several calibration-set sizes: what each tool's compile costs per sample, and what it "
        "costs whatever the size. Agreement and SQNR on the first 256 eval crops. *ours int8* is "
        "`compressor.compress(target='int8')` as it is today; *no search, no guard* drops the two measured "
        "steps, whose cost does not grow with the calibration set. Each row compiles "
        f"{SCALE_REPEATS} times, each time in a fresh child process: s is the median wall time, MB the largest "
        "peak RSS.",
    ]
    write_results(Table("scale", "Compile cost against calibration-set size", SCALE, notes), rows, skipped)


def _wall_and_rss(row: Row) -> str:
    return f"{_fmt('s', row.wall_s)} / {_fmt('mb', row.peak_rss_mb)}"


def scale_lines(rows: Sequence[Row]) -> list[str]:
    """Wall time and peak memory per model and calibration-set size, one column pair per recipe."""
    recipes = [recipe.name for recipe in SCALE]
    short = {ORT_DEFAULTS.name: "ORT defaults", ORT_BEST.name: "ORT best", OURS_INT8.name: "ours"}
    short[OURS_INT8_UNSEARCHED.name] = "ours, no search/guard"
    headers = ["model", "calib samples", *(f"{short[r]} s / MB" for r in recipes), "ours ÷ ORT defaults, time"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for key in dict.fromkeys((r.model, r.calib_samples) for r in rows):
        found = {r.recipe: r for r in rows if (r.model, r.calib_samples) == key and r.wall_s is not None}
        cells = [_wall_and_rss(found[r]) if r in found else "—" for r in recipes]
        ours, peer = found.get(OURS_INT8.name), found.get(ORT_DEFAULTS.name)
        ratio = f"{ours.wall_s / peer.wall_s:.2f}" if ours and peer else "—"
        lines.append("| " + " | ".join([key[0], str(key[1]), *cells, ratio]) + " |")
    return lines


def tables() -> dict[str, Table]:
    """The int8, prune and lowrank tables."""
    from benchmarks import prune  # it builds on this module

    not_ours = "Our {} does not exist yet: no row for it (no numbers are made up)."
    return {
        "int8": Table(
            "int8",
            "int8 post-training quantization: peers vs ours",
            INT8,
            [
                "*ours int8* calls `compressor.compress(target='int8')` with its defaults: calibration on the "
                "first 256 samples, bias correction, the sensitivity and mixed-precision search and the latency "
                "guard, all inside its wall time (its report's own measurements are off, see below). *ours int8, "
                "no search, no guard* is the same quantizer without the two measured steps that onnxruntime's "
                "quantizer does not take: its speed and accuracy show what those steps buy. *ours fp32* is the "
                "measurement's own noise floor.",
                "ORT: `quantize_static`, QDQ, calibration one sample per call. NNCF: `nncf.quantize` on the ONNX "
                "model, subset_size = all calibration samples.",
            ],
        ),
        "prune": prune.TABLE,
        "lowrank": Table(
            "lowrank",
            "Low-rank factorisation: peers vs ours",
            LOWRANK,
            [
                not_ours.format("low-rank pass"),
                "Truncated SVD on the ONNX weights, no fine-tune: W ≈ U_r·V_r with r = ceil(f·min(m, n)), one f "
                "per model bisected so the factored layers keep ~20% of their params; layers where the factors "
                "would be larger are left alone. Convs become k×k→r then 1×1→out.",
            ],
        ),
    }


def main(argv: list[str] | None = None) -> None:
    """Command line; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="Fashion-MNIST models, 500 eval samples, 10 runs")
    parser.add_argument("--slow", action="store_true", help="add efficientnet_lite0, resnet50_224 and scale.md")
    parser.add_argument("--models", nargs="+", help="zoo names (default: the cached default set)")
    parser.add_argument("--only", choices=["int8", "prune", "lowrank", "scale", "rounding"])
    parser.add_argument("--runs", type=int, default=None, help="least latency runs per model (default 20, --fast 10)")
    args = parser.parse_args(argv)
    runs = args.runs or (10 if args.fast else 20)
    eval_limit = 500 if args.fast else None
    names = args.models or (FMNIST if args.fast else [*DEFAULT_MODELS, *(SLOW_MODELS if args.slow else ())])
    start = time.perf_counter()
    selected = [k for k in ("int8", "prune", "lowrank") if args.only in (None, k)]
    if selected:
        models, skipped = load_models(names)
        for key in selected:
            table = tables()[key]
            write_results(table, run_rows(models, table.recipes, runs, eval_limit, args.slow), skipped)
    if args.only == "scale" or (args.only is None and args.slow):
        run_scale(runs)
    if args.only == "rounding" or (args.only is None and args.slow):
        from benchmarks import rounding  # it builds on this module

        rounding.run(runs)
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
