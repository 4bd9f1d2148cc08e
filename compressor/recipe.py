"""A recipe: the whole compression job as data, the one thing `compress` runs.

CLI flags (`Recipe.from_options`), API keywords, a TOML or JSON file
(`Recipe.load`) and the tuner all produce a `Recipe`: the stages in order, each
with its frozen config, plus the backend, the latency guard, the measurements
and the seed. A file looks like this (every key optional; a stage's missing
keys take the backend's preferences, then the config's defaults)::

    seed = 0
    [backend]
    name = "cpu"
    format = "fused"
    [[stages]]
    kind = "quantize_int8"
    calibration = "percentile"

The report stores the recipe that ran with the timing-based choices pinned
(``guard.float_islands``, ``backend.gemm_convs``), so rerunning it on the same
inputs writes the same model, byte for byte.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import tomli_w

from compressor import runtime
from compressor.backends import BACKENDS, Backend, get_backend
from compressor.config import from_mapping, to_mapping
from compressor.errors import ConfigError, UsageError
from compressor.files import atomic_write_bytes
from compressor.stages import PLANNED_STAGES, STAGES, Stage

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

VERSION = 1
FORMATS = ("fused", "qdq")
TARGETS = tuple(dict.fromkeys(("fp32", *(stage.target for stage in STAGES.values()))))


@dataclass(frozen=True)
class BackendSettings:
    """Where the model runs: backend name, onnxruntime threads and the int8 output form.

    ``gemm_convs`` pins which convs take MLAS's GEMM path (the CPU's AMX kernel chooser);
    None lets the backend profile them where that applies.
    """

    name: str = "cpu"
    threads: int = runtime.DEFAULT_THREADS
    format: str = "fused"  # int8 output: fused integer operators (CPU) or portable QDQ
    gemm_convs: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.name not in BACKENDS:
            raise ConfigError(f"backend.name: unknown backend {self.name!r}; choose one of: {', '.join(BACKENDS)}")
        if self.threads < 1:
            raise ConfigError(f"backend.threads must be >= 1, got {self.threads}")
        if self.format not in FORMATS:
            raise ConfigError(f"backend.format: {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.gemm_convs is not None and (self.name != "cpu" or self.format != "fused"):
            raise ConfigError("backend.gemm_convs applies to name = 'cpu' with format = 'fused' only; remove it")

    def build(self) -> Backend:
        """A fresh backend for one run."""
        return get_backend(self.name, threads=self.threads, qdq=self.format == "qdq", gemm_convs=self.gemm_convs)


@dataclass(frozen=True)
class GuardSettings:
    """The latency guard: time each int8 island and keep float where the model runs faster.

    ``float_islands`` pins the nodes put in float (no timing); None times them.
    """

    latency: bool = True
    float_islands: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.float_islands is not None and not self.latency:
            raise ConfigError("guard.float_islands needs guard.latency = true; remove one of them")


@dataclass(frozen=True)
class MeasureSettings:
    """What the report measures beyond size and MACs (each re-runs both models)."""

    latency: bool = True
    fidelity: bool = True  # accuracy, agreement and SQNR on the eval (or calibration) data


@dataclass(frozen=True)
class Recipe:
    """A whole compression job: stage configs in order, backend, guard, measurements, seed."""

    stages: tuple[Any, ...] = ()  # config dataclasses of `compressor.stages.STAGES` kinds
    backend: BackendSettings = field(default_factory=BackendSettings)
    guard: GuardSettings = field(default_factory=GuardSettings)
    measure: MeasureSettings = field(default_factory=MeasureSettings)
    seed: int = 0
    version: int = VERSION

    def __post_init__(self) -> None:
        if self.version != VERSION:
            raise ConfigError(f"version: this compressor reads recipe version {VERSION}, got {self.version!r}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        kinds = [_kind_of(config, f"stages[{i}]") for i, config in enumerate(self.stages)]
        for index, kind in enumerate(kinds):
            if kind in kinds[:index]:
                raise ConfigError(f"stages[{index}].kind: {kind!r} appears twice; keep one")
            if index and STAGES[kind].rank < STAGES[kinds[index - 1]].rank:
                raise ConfigError(f"stages[{index}].kind: {kind!r} must come before {kinds[index - 1]!r}")
        if {"quantize_int8", "quantize_int16"} <= set(kinds):
            raise ConfigError("stages: quantize_int8 and quantize_int16 both quantize the model; keep one")
        if self.guard.float_islands is not None and not self.stages:
            raise ConfigError("guard.float_islands needs a quantization stage; remove it")

    @property
    def target(self) -> str:
        """What the result is called (``fp32`` with no stages, else the last stage's target)."""
        return STAGES[_kind_of(self.stages[-1], "stages[-1]")].target if self.stages else "fp32"

    def build_stages(self) -> list[Stage]:
        """Fresh stage objects for one run, in order."""
        return [STAGES[_kind_of(config, "")](config) for config in self.stages]

    @classmethod
    def from_options(
        cls,
        target: str = "fp32",
        *,
        backend: str = "cpu",
        threads: int = runtime.DEFAULT_THREADS,
        qdq: bool = False,
        seed: int = 0,
        latency_guard: bool = True,
        measure_latency: bool = True,
        measure_fidelity: bool = True,
        int8: Mapping[str, object] | None = None,
        explain: bool = False,
        prune: Mapping[str, object] | None = None,
        int16: Mapping[str, object] | None = None,
    ) -> Recipe:
        """The recipe that `compress`'s keywords (and the CLI's flags) describe.

        ``int8`` overrides fields of the int8 stage's config on top of the backend's preferences.
        ``int16`` does the same for the int16 stage (``target="int16"``).
        ``prune`` (fields of `PruneConfig`, ``fraction`` among them) adds a prune stage first.
        """
        if target not in TARGETS:
            raise UsageError(f"unknown target {target!r}; choose one of: {', '.join(TARGETS)}")
        settings = BackendSettings(backend, threads, "qdq" if qdq else "fused")
        stages: tuple[Any, ...] = ()
        if prune is not None:
            stages = (_stage_config(STAGES["prune"], prune, settings, "prune"),)
        if target == "int8":
            stage = STAGES["quantize_int8"]
            given = {**(int8 or {}), **({"explain": True} if explain else {})}
            stages = (*stages, _stage_config(stage, given, settings, "int8"))
        elif target == "int16":
            stages = (*stages, _stage_config(STAGES["quantize_int16"], int16 or {}, settings, "int16"))
        measure = MeasureSettings(measure_latency, measure_fidelity)
        return cls(stages, settings, GuardSettings(latency_guard), measure, seed)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        """A recipe from plain data (a parsed TOML or JSON file); errors name the offending key."""
        known = ("version", "seed", "backend", "guard", "measure", "stages")
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown key {unknown[0]!r}; known keys: {', '.join(known)}")
        tables = {name: data.get(name, {}) for name in ("backend", "guard", "measure")}
        for name, table in tables.items():
            if not isinstance(table, Mapping):
                raise ConfigError(f"{name}: expected a table, got {table!r}")
        backend = from_mapping(BackendSettings, tables["backend"], "backend")
        entries = data.get("stages", [])
        if not isinstance(entries, list):
            raise ConfigError(f"stages: expected a list of tables, got {entries!r}")
        stages = []
        for index, entry in enumerate(entries):
            where = f"stages[{index}]"
            if not isinstance(entry, Mapping):
                raise ConfigError(f"{where}: expected a table, got {entry!r}")
            kind = entry.get("kind")
            if kind in PLANNED_STAGES:
                raise ConfigError(f"{where}.kind: {kind!r} is not implemented yet; known: {', '.join(STAGES)}")
            if kind not in STAGES:
                raise ConfigError(f"{where}.kind: unknown stage {kind!r}; choose one of: {', '.join(STAGES)}")
            given = {key: value for key, value in entry.items() if key != "kind"}
            stages.append(_stage_config(STAGES[kind], given, backend, where))
        top = {key: data[key] for key in ("seed", "version") if key in data}
        scalars = from_mapping(_TopLevel, top, "recipe")
        return cls(
            tuple(stages),
            backend,
            from_mapping(GuardSettings, tables["guard"], "guard"),
            from_mapping(MeasureSettings, tables["measure"], "measure"),
            scalars.seed,
            scalars.version,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data that `from_dict` reads back into an equal recipe (None written as ``"none"``)."""
        return {
            "version": self.version,
            "seed": self.seed,
            "backend": to_mapping(self.backend),
            "guard": to_mapping(self.guard),
            "measure": to_mapping(self.measure),
            "stages": [{"kind": _kind_of(c, ""), **to_mapping(c)} for c in self.stages],
        }

    def to_toml(self) -> str:
        """The recipe as a TOML document."""
        return tomli_w.dumps(self.to_dict())

    def to_json(self) -> str:
        """The recipe as a JSON document."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        """Write the recipe atomically, as TOML unless ``path`` ends in ``.json``."""
        text = self.to_json() if Path(path).suffix == ".json" else self.to_toml()
        atomic_write_bytes(path, text.encode())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Recipe:
        """A recipe from a ``.toml`` or ``.json`` file, or from the ``recipe`` of a JSON report."""
        file = Path(path)
        if not file.is_file():
            raise UsageError(f"recipe file not found: {file}; check the path")
        try:
            if file.suffix == ".json":
                data = json.loads(file.read_text())
                data = data.get("recipe", data) if isinstance(data, dict) and "summary" in data else data
            else:
                data = tomllib.loads(file.read_text())
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
            raise ConfigError(f"{file}: not a valid recipe file: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: expected a table of recipe keys, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{file}: {exc}") from exc

    def pinned(self, float_islands: tuple[str, ...] | None, backend_choices: Mapping[str, Any]) -> Recipe:
        """This recipe with a run's timing-based choices fixed, so that a rerun repeats them.

        ``float_islands``: what the latency guard put in float (None: it did not run);
        ``backend_choices``: `BackendSettings` fields from `Backend.timed_choices`.
        """
        guard = replace(self.guard, float_islands=float_islands) if float_islands is not None else self.guard
        return replace(self, backend=replace(self.backend, **backend_choices), guard=guard)


@dataclass(frozen=True)
class _TopLevel:
    seed: int = 0
    version: int = VERSION


def _stage_config(stage: type[Stage], given: Mapping[str, object], backend: BackendSettings, where: str) -> Any:
    """The stage's config: the backend's preferences, then ``given`` on top."""
    preferences = stage.defaults(backend.build())
    return from_mapping(stage.config_class, {**preferences, **given}, where)


def _kind_of(config: Any, where: str) -> str:
    for kind, stage in STAGES.items():
        if type(config) is stage.config_class:
            return kind
    raise ConfigError(f"{where}: {type(config).__name__} is not the config of any stage")
