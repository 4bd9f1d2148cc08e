"""Per-layer int8 sensitivity and the mixed-precision search built on it.

`layer_sensitivity` quantizes one compute node at a time (its weights and its
input activation; every other node stays float) and measures the SQNR of the
model's outputs against fp32 on a few calibration samples. Calibration runs
once: every single-layer variant reuses the same `CalibrationStats`.

`MixedPrecision` is the policy `compressor.compress` hands to `QuantizeInt8`:
while the fully quantized model's output SQNR is below
``config.min_sqnr_db``, keep the next most sensitive layer in float, up to
``config.max_float_fraction`` of the compute layers, and return the set that
reached the target (or the best one seen).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import onnx
import onnx_ir as ir

from compressor import ir as cir
from compressor import runtime
from compressor.data import Dataset
from compressor.errors import ModelError
from compressor.metrics import compare_outputs
from compressor.passes.quantize_int8 import (
    CalibrationStats,
    QuantizeInt8Config,
    apply_quantization,
    calibrate,
    quantizable_nodes,
)
from compressor.pipeline import PassContext


@dataclass(frozen=True)
class LayerSensitivity:
    """Model-output SQNR vs fp32 when only ``node`` is quantized (lower is more sensitive)."""

    node: str
    op: str
    sqnr_db: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class _Probe:
    """A few calibration batches and the fp32 model's outputs on them, for repeated SQNR checks."""

    def __init__(self, model: onnx.ModelProto, dataset: Dataset, samples: int, batch_size: int) -> None:
        self.feeds = [batch.feeds for batch in dataset.batches(batch_size=batch_size, limit=samples)]
        self.reference = self._outputs(model)

    def _outputs(self, model: onnx.ModelProto) -> list[np.ndarray]:
        session = runtime.make_session(model)
        runs = [runtime.run(session, feeds) for feeds in self.feeds]
        return [np.concatenate(parts) for parts in zip(*runs, strict=True)]

    def sqnr_db(self, model: onnx.ModelProto) -> float:
        return float(compare_outputs(self.reference, self._outputs(model)).sqnr_db)


def _quantized(float_model: onnx.ModelProto, config: QuantizeInt8Config, stats: CalibrationStats) -> onnx.ModelProto:
    copy = ir.serde.deserialize_model(float_model)
    apply_quantization(copy, config, stats)
    return cir.to_proto(copy)


def layer_sensitivity(
    model: ir.Model,
    dataset: Dataset,
    config: QuantizeInt8Config | None = None,
    stats: CalibrationStats | None = None,
    *,
    samples: int | None = None,
) -> list[LayerSensitivity]:
    """One entry per quantizable compute node of the float ``model`` (not modified), worst SQNR first.

    ``stats`` (from `compressor.passes.quantize_int8.calibrate`) is computed
    once here when not given; ``samples`` defaults to ``config.sensitivity_samples``.
    """
    config = config or QuantizeInt8Config()
    stats = stats or calibrate(model, dataset, config)
    proto = cir.to_proto(model)
    probe = _Probe(proto, dataset, samples or config.sensitivity_samples, config.batch_size)
    return _rank(proto, probe, config, stats)


def _rank(
    proto: onnx.ModelProto, probe: _Probe, config: QuantizeInt8Config, stats: CalibrationStats
) -> list[LayerSensitivity]:
    compute, everything = quantizable_nodes(ir.serde.deserialize_model(proto), config)
    results = []
    for name, op in compute:
        alone = replace(config, keep_float=config.keep_float | (everything - {name}))
        results.append(LayerSensitivity(name, op, probe.sqnr_db(_quantized(proto, alone, stats))))
    return sorted(results, key=lambda r: (r.sqnr_db, r.node))


@dataclass
class MixedPrecision:
    """Keep the most sensitive layers in float until the model reaches ``config.min_sqnr_db``.

    Called by `QuantizeInt8` (``choose_float=``) with the float model and its
    calibration statistics; reads the data from ``dataset`` or the active
    `PassContext`. ``explain`` ranks every layer even when no search is needed.
    After the call: ``sensitivity`` (worst first, empty if not ranked) and
    ``history`` (layers kept in float -> model SQNR, in search order).
    """

    dataset: Dataset | None = None
    explain: bool = False
    sensitivity: list[LayerSensitivity] = field(default_factory=list)
    history: list[tuple[tuple[str, ...], float]] = field(default_factory=list)

    def __call__(self, model: ir.Model, stats: CalibrationStats, config: QuantizeInt8Config) -> dict[str, str]:
        dataset = self.dataset or PassContext.current().calibration
        if dataset is None:
            raise ModelError("the mixed-precision search needs calibration data: pass --calib DATA.npz")
        proto = cir.to_proto(model)
        probe = _Probe(proto, dataset, config.sensitivity_samples, config.batch_size)
        compute, _ = quantizable_nodes(model, config)
        budget = math.ceil(config.max_float_fraction * len(compute))
        sqnr = probe.sqnr_db(_quantized(proto, config, stats))
        self.history = [((), sqnr)]
        target = config.min_sqnr_db
        search = target is not None and sqnr < target and budget > 0
        self.sensitivity = _rank(proto, probe, config, stats) if search or self.explain else []
        if not search:
            return {}
        best, kept = (sqnr, 0), []
        for layer in self.sensitivity[:budget]:
            kept.append(layer.node)
            sqnr = probe.sqnr_db(_quantized(proto, replace(config, keep_float=config.keep_float | set(kept)), stats))
            self.history.append((tuple(kept), sqnr))
            if sqnr > best[0]:
                best = (sqnr, len(kept))
            if sqnr >= target:
                break
        alone = {layer.node: layer.sqnr_db for layer in self.sensitivity}
        return {name: f"sensitivity: {alone[name]:.1f} dB alone" for name in kept[: best[1]]}


def format_table(sensitivity: Sequence[LayerSensitivity], limit: int | None = None) -> str:
    """The ``limit`` most sensitive layers as a Markdown table."""
    lines = ["| rank | node | op | SQNR alone |", "|---|---|---|---|"]
    for rank, layer in enumerate(sensitivity[:limit], start=1):
        lines.append(f"| {rank} | {layer.node} | {layer.op} | {layer.sqnr_db:.1f} dB |")
    return "\n".join(lines)
