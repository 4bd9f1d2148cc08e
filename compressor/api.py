"""The Python API: `compress()` runs a `Recipe`, and its keywords mirror the ``compress`` command line."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_ir as ir

from compressor import ir as cir
from compressor import measurement, runtime
from compressor.data import Dataset, Samples
from compressor.errors import UsageError
from compressor.images import ImageFolder, Preprocess
from compressor.instruments import DumpIR, Instrument, ProgressBar, Timing, VerifyNumerics, stage
from compressor.passes import import_passes
from compressor.pipeline import PassContext, Pipeline
from compressor.quantization.sensitivity import LayerSensitivity
from compressor.recipe import Recipe
from compressor.report import Report


@dataclass
class Result:
    """What `compress` produced: the IR model, its lowering, the measured report and the recipe that ran."""

    model: ir.Model
    lowered: onnx.ModelProto
    report: Report
    recipe: Recipe  # timing-based choices pinned: rerunning it on the same inputs writes the same model
    sensitivity: list[LayerSensitivity] = field(default_factory=list)  # int8: worst layer first, when ranked

    def save(self, path: str | os.PathLike, *, force: bool = False) -> list[Path]:
        """Write the lowered model atomically; refuses to overwrite unless ``force``."""
        written = cir.save_model(self.lowered, path, force=force)
        self.report.output = str(Path(path))
        return written


def compress(
    model: str | os.PathLike | ir.Model | onnx.ModelProto,
    target: str | None = None,
    *,
    recipe: Recipe | str | os.PathLike | None = None,
    calib: str | os.PathLike | None = None,
    eval: str | os.PathLike | None = None,  # noqa: A002 - mirrors the CLI flag
    train: str | os.PathLike | None = None,
    preprocess: str | None = None,
    verify: bool = False,
    dump_ir: str | os.PathLike | None = None,
    progress: bool | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    backend: str | None = None,
    threads: int | None = None,
    qdq: bool | None = None,
    seed: int | None = None,
    latency_guard: bool | None = None,
    measure_latency: bool | None = None,
    measure_fidelity: bool | None = None,
    int8: Mapping[str, object] | None = None,
    explain: bool | None = None,
    prune: Mapping[str, object] | None = None,
    int16: Mapping[str, object] | None = None,
) -> Result:
    """Compress an ONNX model for a backend and measure it against the original.

    ``model`` is a path, an `onnx_ir.Model` or an `onnx.ModelProto` (not modified).
    ``calib``/``eval`` are ``.npz`` files (``x`` and optional ``y``) or folders of
    images, read with ``preprocess`` (see `compressor.images.Preprocess.parse`). ``input_shapes``
    fixes the sizes an input leaves symbolic, for what needs them without data (the report's
    latency and SQNR, ``verify``): ``{"x": (1, 3, 640, 640)}``; the model keeps them symbolic.

    The job is a `Recipe`: either ``recipe`` (a `Recipe`, or a TOML/JSON file or
    report) or ``target`` (``fp32``, ``int8``, ``int16``) with the keywords of
    `Recipe.from_options`, which default to cpu, 2 threads, fused int8 operators, seed 0, the
    latency guard and both measurements on. ``int8`` overrides fields of `QuantizeInt8Config` (the
    backend's fast-path choices are the defaults); ``explain`` ranks every layer's int8 sensitivity
    (``Result.sensitivity``). ``int16`` overrides fields of `QuantizeInt16Config` (INT16 dynamic
    fixed point: int16 QDQ with power-of-two scales, which `IntegerReference` runs in integers).
    ``prune`` (fields of `PruneConfig`: ``{"fraction": 0.5}``) first removes
    that fraction of the MACs as whole channels (structured pruning), fine-tuned on ``train`` (an
    ``.npz`` with labels ``y``, or an image folder) when given.
    ``qdq`` keeps the portable QDQ form instead of fused integer operators.
    ``latency_guard`` (on backends that support it) times each int8 island and keeps it in float
    where the model runs faster that way. Raises a `CompressorError` subclass for bad input.
    """
    options = {
        "backend": backend, "threads": threads, "qdq": qdq, "seed": seed, "latency_guard": latency_guard,
        "measure_latency": measure_latency, "measure_fidelity": measure_fidelity, "int8": int8, "explain": explain,
        "prune": prune, "int16": int16,
    }  # fmt: skip
    job = _recipe(target, recipe, {name: value for name, value in options.items() if value is not None})
    chosen_backend = job.backend.build()
    stages = job.build_stages()
    working = _load(model)
    shapes = {name: tuple(dims) for name, dims in (input_shapes or {}).items()}
    specs = runtime.input_specs(working, shapes)
    context = PassContext(
        # Each batch is checked as it is read. Calibration data is first read by calibration, the first real
        # work; evaluation data only by the final report, so it is read through once up front instead.
        calibration=_dataset(calib, specs, preprocess, read_through=False),
        evaluation=_dataset(eval, specs, preprocess, read_through=True),
        train=_dataset(train, specs, preprocess, read_through=False),
        backend=chosen_backend.name,
        seed=job.seed,
        input_shapes=shapes,
    )
    original = measurement.Original(model, working, measurement.cost_shapes(specs, context))
    bar = ProgressBar(progress)
    context.progress = bar.enabled
    instruments: list[Instrument] = [Timing(), bar]
    if verify:
        instruments.append(VerifyNumerics())
    if dump_ir is not None:
        instruments.append(DumpIR(dump_ir))
    passes = import_passes() + [p for s in stages for p in s.passes(chosen_backend)]
    records = Pipeline(passes).run(working, context, instruments)
    lowered, float_islands = None, None
    for each in stages:
        settled = each.settle(working, chosen_backend, context, job.guard.float_islands, job.guard.latency)
        working, lowered = settled.model, settled.lowered
        float_islands = settled.float_islands if settled.float_islands is not None else float_islands
    if lowered is None:
        with stage("lowering", f" for {chosen_backend.name}", context):
            lowered = chosen_backend.lower(working)
    report = Report(
        model=str(model) if isinstance(model, (str, os.PathLike)) else "<in-memory model>",
        target=job.target,
        backend=chosen_backend.name,
        passes=[r.as_dict() for r in records],
    )
    report.kept_float = dict(chosen_backend.rejected)
    report.lowering = {rewrite: nodes for rewrite, nodes in chosen_backend.rewrites.items() if nodes}
    for each in stages:
        each.report(report, chosen_backend)
    ran = job.pinned(float_islands, chosen_backend.timed_choices())
    report.recipe = ran.to_dict()
    with stage("measuring", " the compressed model against the original", context):
        measurement.summary(report, original, lowered, working, chosen_backend, context, specs, job.measure.latency)
        if job.measure.fidelity:
            known = next((s.reference_outputs for s in stages if s.reference_outputs), ())
            measurement.fidelity(report, original, lowered, chosen_backend, context, specs, known)
    report.steps = {name: round(seconds, 4) for name, seconds in context.steps.items()}
    sensitivity = next((s.sensitivity for s in stages if s.sensitivity), [])
    return Result(working, lowered, report, ran, sensitivity)


def _recipe(target: str | None, recipe: Recipe | str | os.PathLike | None, given: dict[str, object]) -> Recipe:
    if recipe is None:
        return Recipe.from_options(target or "fp32", **given)  # type: ignore[arg-type]
    clashes = ([f"target={target!r}"] if target is not None else []) + sorted(given)
    if clashes:
        raise UsageError(f"recipe= describes the whole job; drop {', '.join(clashes)} (or change the recipe)")
    return recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)


def _load(model: str | os.PathLike | ir.Model | onnx.ModelProto) -> ir.Model:
    if isinstance(model, ir.Model):
        return ir.serde.deserialize_model(cir.to_proto(model))
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    return cir.load_model(model)


def _dataset(
    path: str | os.PathLike | None, specs: Sequence[runtime.InputSpec], preprocess: str | None, read_through: bool
) -> Samples | None:
    if path is None:
        return None
    if Path(path).is_dir():
        dataset: Samples = ImageFolder(path, specs, Preprocess.parse(preprocess))
    elif preprocess:
        raise UsageError(f"--preprocess applies to image folders, and {path} is a file; drop --preprocess")
    else:
        dataset = Dataset(path, specs)
    if read_through:
        dataset.validate()
    return dataset
