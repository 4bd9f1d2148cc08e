"""Per-layer int8 sensitivity and the mixed-precision search built on it.

`layer_sensitivity` measures every compute layer in one pass over a few
calibration batches: each Conv/Gemm/MatMul gets a quantized twin that reads the
same float input through Q/DQ and uses the int8 weights (and corrected int32
bias) the real quantization would produce. The SQNR of the twin's output
against the float layer's output is the layer's sensitivity (nothing else is
quantized, so errors do not compound). The run also yields each layer's MACs.

`MixedPrecision` is the policy `compressor.compress` hands to `QuantizeInt8`.
While the fully quantized model's output SQNR is below ``config.min_sqnr_db``,
it tries keeping the next most sensitive layer in float and keeps it only if the
model's SQNR rises. Errors of neighbouring layers interact (EfficientNet-Lite0's
stem helps only beside the depthwise conv it feeds), so once a layer is kept,
each layer rejected before is tried once more. Float layers cost speed, so together they may hold at most
``config.max_float_fraction`` of the model's MACs; a layer that int8 breaks
outright (below `BROKEN_DB` alone) is tried regardless of that budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import onnx
import onnx_ir as ir

from compressor import ir as cir
from compressor import runtime
from compressor.data import Samples
from compressor.errors import ModelError
from compressor.instruments import stage
from compressor.metrics import compare_outputs
from compressor.pipeline import PassContext
from compressor.quantization.calibration import BATCH_INPUT_ELEMENTS
from compressor.quantization.int8 import (
    CalibrationStats,
    QuantizeInt8Config,
    apply_quantization,
    calibrate,
    quantizable_nodes,
)
from compressor.quantization.params import activation_params, quantize_node_weights, weight_channel_axis

BROKEN_DB = 10.0  # a layer this bad alone ruins the model: keep it in float whatever it costs
MIN_GAIN_DB = 0.1  # a float layer that raises the model's SQNR by less is not worth its cost
MAX_TRIALS = 8  # model evaluations the search may spend after the first
GROW_BISECTIONS = 4  # with the int16 fallback: trials narrowing how many layers int16 needs
RANK_SAMPLES = 8  # a layer's output holds thousands of values per sample: a few samples rank it
# ...and a large input gives each layer hundreds of thousands: ranking sees at most about this many
# input values, at least `MIN_RANK_SAMPLES` samples (2 images at 224x224). The twin model runs about
# three times slower than the float one; EfficientNet-Lite0 keeps the same layers in float ranked on
# 2 images as on 3.
RANK_INPUT_ELEMENTS = 2**18
MIN_RANK_SAMPLES = 2


@dataclass(frozen=True)
class LayerSensitivity:
    """SQNR of ``node``'s output with only its input and weights in int8 (lower is more sensitive)."""

    node: str
    op: str
    sqnr_db: float
    macs: int  # per sample

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def layer_sensitivity(
    model: ir.Model | onnx.ModelProto,
    dataset: Samples,
    config: QuantizeInt8Config | None = None,
    stats: CalibrationStats | None = None,
    *,
    samples: int | None = None,
) -> list[LayerSensitivity]:
    """One entry per quantizable compute node of the float ``model`` (not modified), worst SQNR first.

    ``stats`` (from `compressor.quantization.int8.calibrate`) is computed
    here when not given; ``samples`` defaults to `rank_samples`.
    """
    config = config or QuantizeInt8Config()
    float_model = _as_ir(model)
    stats = stats or calibrate(float_model.clone(), dataset, config)
    twins, pairs = _with_quantized_twins(float_model, config, stats)
    session = runtime.make_session(twins, options=runtime.session_options(many_outputs=True))
    del twins  # as large as the model; onnxruntime has its own copy
    names = [output.name for output in session.get_outputs()]
    signal = dict.fromkeys(pairs, 0.0)
    noise = dict.fromkeys(pairs, 0.0)
    macs: dict[str, int] = {}
    batch_size = dataset.batch_size_for(BATCH_INPUT_ELEMENTS, config.batch_size)
    limit = samples or rank_samples(dataset, config)
    for batch in dataset.batches(batch_size=batch_size, limit=limit):
        outputs = dict(zip(names, runtime.run(session, batch.feeds), strict=True))
        for node, probe in pairs.items():
            signal[node] += float(outputs[probe.signal])
            noise[node] += float(outputs[probe.noise])
            macs[node] = probe.macs_per_value * int(np.prod(outputs[probe.shape][1:]))
    ops = dict(quantizable_nodes(float_model, config)[0])
    results = [LayerSensitivity(node, ops[node], _db(signal[node], noise[node]), macs[node]) for node in pairs]
    return sorted(results, key=lambda r: (r.sqnr_db, r.node))


def rank_samples(dataset: Samples, config: QuantizeInt8Config) -> int:
    """Calibration samples the ranking runs: `RANK_SAMPLES`, fewer for large inputs, never above the probe's."""
    by_size = max(MIN_RANK_SAMPLES, RANK_INPUT_ELEMENTS // max(dataset.sample_elements(), 1))
    return min(config.sensitivity_samples, RANK_SAMPLES, by_size)


def _as_ir(model: ir.Model | onnx.ModelProto) -> ir.Model:
    """An IR view of a proto (its tensors shared), or the IR model itself."""
    return model if isinstance(model, ir.Model) else ir.serde.deserialize_model(model)


def _db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return float("inf")
    return float(10.0 * np.log10(max(signal, 1e-30) / noise))


@dataclass(frozen=True)
class _TwinOutputs:
    """Graph outputs that measure one layer against its int8 twin, per batch."""

    signal: str  # sum of squares of the float output
    noise: str  # sum of squares of (twin output - float output)
    shape: str  # the float output's shape
    macs_per_value: int


def _with_quantized_twins(
    model: ir.Model, config: QuantizeInt8Config, stats: CalibrationStats
) -> tuple[ir.Model, dict[str, _TwinOutputs]]:
    """A copy of ``model`` where each compute node has an int8 twin and outputs its error as two sums.

    The sums are computed inside the model (ReduceSumSquare), so no activation
    leaves onnxruntime and memory stays that of one forward pass.
    """
    copy = model.clone()  # shares the tensors; the model is not modified
    graph = copy.graph
    wanted = {name for name, _ in quantizable_nodes(copy, config)[0]}
    pairs: dict[str, _TwinOutputs] = {}
    names = cir.UniqueNames(graph)
    for node in [n for n in graph if n.name in wanted]:
        source = node.inputs[0]
        params = activation_params(*stats.ranges[source.name], config)
        scale = cir.add_initializer(graph, f"{node.name}__twin_scale", np.array(params.scale, np.float32), names)
        zero = cir.add_initializer(graph, f"{node.name}__twin_zero", np.array(params.zero_point, params.dtype), names)
        quantize = ir.Node("", "QuantizeLinear", [source, scale, zero], name=f"{node.name}__twin_q")
        dequantize = ir.Node("", "DequantizeLinear", [quantize.outputs[0], scale, zero], name=f"{node.name}__twin_dq")
        attributes = [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()]
        twin = ir.Node(node.domain, node.op_type, [dequantize.outputs[0], *node.inputs[1:]], attributes=attributes,
                       name=f"{node.name}__twin")  # fmt: skip
        graph.insert_after(node, [quantize, dequantize, twin])
        weight = node.inputs[1].const_value
        mean = stats.means.get(source.name) if config.bias_correction else None
        quantize_node_weights(graph, twin, params, config, mean, names, stats.weights, stats.rounded)
        output = node.outputs[0]
        keep = [ir.AttrInt64("keepdims", 0)]
        error = ir.Node("", "Sub", [twin.outputs[0], output], name=f"{node.name}__twin_error")
        noise = ir.Node("", "ReduceSumSquare", [error.outputs[0]], attributes=keep, name=f"{node.name}__twin_noise")
        signal = ir.Node("", "ReduceSumSquare", [output], attributes=keep, name=f"{node.name}__twin_signal")
        shape = ir.Node("", "Shape", [output], name=f"{node.name}__twin_shape")
        graph.insert_after(twin, [error, noise, signal, shape])
        for measured in (signal, noise, shape):
            measured.outputs[0].name = names.fresh(measured.name)
            graph.outputs.append(measured.outputs[0])
        pairs[node.name] = _TwinOutputs(
            signal.outputs[0].name, noise.outputs[0].name, shape.outputs[0].name, _macs_per_output_value(node, weight)
        )
    return copy, pairs


def _macs_per_output_value(node: ir.Node, weight: ir.TensorProtocol) -> int:
    per_value = int(np.prod(weight.shape)) // int(weight.shape[weight_channel_axis(node, len(weight.shape))])
    if node.op_type == "ConvTranspose":  # each input value feeds C_out/group * k outputs: fewer per output
        groups = node.attributes["group"].as_int() if "group" in node.attributes else 1
        strides = node.attributes["strides"].as_ints() if "strides" in node.attributes else [1]
        per_value = max(1, per_value // (groups * int(np.prod(strides))))
    return per_value


class _Probe:
    """A few calibration batches and the fp32 model's outputs on them, for repeated model-SQNR checks.

    The outputs come from ``stats`` when calibration kept enough of them (the same first samples).
    """

    def __init__(
        self, model: ir.Model, dataset: Samples, samples: int, batch_size: int, stats: CalibrationStats
    ) -> None:
        self.feeds = [batch.feeds for batch in dataset.batches(batch_size=batch_size, limit=samples)]
        count = sum(next(iter(feeds.values())).shape[0] for feeds in self.feeds)
        kept = stats.outputs
        self.reference = [o[:count] for o in kept] if kept and len(kept[0]) >= count else self._outputs(model)

    def _outputs(self, model: ir.Model) -> list[np.ndarray]:
        session = runtime.make_session(model)
        runs = [runtime.run(session, feeds) for feeds in self.feeds]
        return [np.concatenate(parts) for parts in zip(*runs, strict=True)]

    def sqnr_db(self, model: ir.Model) -> float:
        return float(compare_outputs(self.reference, self._outputs(model)).sqnr_db)


def _quantized(float_model: ir.Model, config: QuantizeInt8Config, stats: CalibrationStats) -> ir.Model:
    copy = float_model.clone()  # shares the float tensors; quantization replaces them rather than writing to them
    apply_quantization(copy, config, stats)
    return copy


@dataclass
class MixedPrecision:
    """Keep the most sensitive layers in float while that lifts the model toward ``config.min_sqnr_db``.

    Called by `QuantizeInt8` (``choose_float=``) with the float model and its
    calibration statistics; reads the data from ``dataset`` or the active
    `PassContext`. ``explain`` ranks every layer even when no search is needed.
    After the call: ``sensitivity`` (worst first, empty if not ranked) and
    ``history`` (layers kept in float -> model SQNR, for every evaluation, in
    order; a layer that did not help is dropped again in the next entry).
    """

    dataset: Samples | None = None
    explain: bool = False
    sensitivity: list[LayerSensitivity] = field(default_factory=list)
    history: list[tuple[tuple[str, ...], float]] = field(default_factory=list)

    def __call__(
        self, model: ir.Model | onnx.ModelProto, stats: CalibrationStats, config: QuantizeInt8Config
    ) -> dict[str, str]:
        dataset = self.dataset or PassContext.current().calibration
        if dataset is None:
            raise ModelError("the mixed-precision search needs calibration data: pass --calib DATA.npz")
        float_model = _as_ir(model)
        batch_size = dataset.batch_size_for(BATCH_INPUT_ELEMENTS, config.batch_size)
        with stage("int8 SQNR check"):
            probe = _Probe(float_model, dataset, config.sensitivity_samples, batch_size, stats)
            best = probe.sqnr_db(_quantized(float_model, config, stats))
        self.history = [((), best)]
        target = config.min_sqnr_db
        search = target is not None and best < target and config.max_float_fraction > 0
        ranked: list[LayerSensitivity] = []
        if search or self.explain:
            with stage("sensitivity ranking"):
                ranked = layer_sensitivity(float_model, dataset, config, stats)
        self.sensitivity = ranked
        if not search:
            return {}
        budget = config.max_float_fraction * sum(layer.macs for layer in ranked)
        kept: list[LayerSensitivity] = []
        queue, rejected, retried = list(ranked), [], set()
        while queue and best < target and len(self.history) <= MAX_TRIALS:
            layer = queue.pop(0)
            if layer.sqnr_db >= target:
                break
            spent = sum(k.macs for k in kept) + layer.macs
            if spent > budget and layer.sqnr_db >= BROKEN_DB:
                continue
            names = (*(k.node for k in kept), layer.node)
            variant = replace(config, keep_float=config.keep_float | set(names))
            with stage("mixed-precision trials", f": {layer.node} in float"):
                sqnr = probe.sqnr_db(_quantized(float_model, variant, stats))
            self.history.append((names, sqnr))
            if sqnr < best + MIN_GAIN_DB:
                rejected.append(layer)
                continue
            kept.append(layer)
            best = sqnr
            # Errors of neighbouring layers interact: retry each rejected layer once beside the grown set.
            again = [r for r in rejected if r.node not in retried]
            retried.update(r.node for r in again)
            queue, rejected = again + queue, []
        if best < target and config.fallback == "int16":
            kept, best = self._grow(probe, float_model, config, stats, ranked, kept, best)
        if self.history[-1][0] != tuple(k.node for k in kept):
            self.history.append((tuple(k.node for k in kept), best))
        return {k.node: f"sensitivity: {k.sqnr_db:.1f} dB alone, {k.macs / 1e6:.1f} MMACs" for k in kept}

    def _grow(
        self,
        probe: _Probe,
        float_model: ir.Model,
        config: QuantizeInt8Config,
        stats: CalibrationStats,
        ranked: list[LayerSensitivity],
        kept: list[LayerSensitivity],
        best: float,
    ) -> tuple[list[LayerSensitivity], float]:
        """With the int16 fallback: the fewest most-sensitive layers in int16 that reach the target.

        Greedy one-layer steps stall where int8's error is spread over many layers (EfficientNet-Lite0:
        20.6 dB after 6 layers), so whole prefixes of the ranking are tried, k doubling, then bisected.
        ``max_float_fraction`` does not bound them: nothing is float, and int16 layers stay integer.
        """

        def trial(count: int) -> float:
            names = tuple(layer.node for layer in ranked[:count])
            variant = replace(config, keep_float=config.keep_float | set(names))
            with stage("mixed-precision trials", f": the {count} most sensitive layers in int16"):
                sqnr = probe.sqnr_db(_quantized(float_model, variant, stats))
            self.history.append((names, sqnr))
            return sqnr

        failing, passing, count = len(kept), None, min(max(2 * len(kept), 2), len(ranked))
        while count > failing:
            sqnr = trial(count)
            if sqnr >= best + MIN_GAIN_DB:
                kept, best = ranked[:count], sqnr
            if sqnr >= config.min_sqnr_db:
                passing = count
                break
            failing, count = count, min(2 * count, len(ranked))
        for _ in range(GROW_BISECTIONS):
            if passing is None or passing - failing <= 1:
                break
            middle = (failing + passing) // 2
            sqnr = trial(middle)
            if sqnr >= config.min_sqnr_db:
                passing, kept, best = middle, ranked[:middle], sqnr
            else:
                failing = middle
        return list(kept), best


def format_table(sensitivity: Sequence[LayerSensitivity], limit: int | None = None) -> str:
    """The ``limit`` most sensitive layers as a Markdown table."""
    lines = ["| rank | node | op | SQNR alone | MMACs |", "|---|---|---|---|---|"]
    for rank, layer in enumerate(sensitivity[:limit], start=1):
        lines.append(f"| {rank} | {layer.node} | {layer.op} | {layer.sqnr_db:.1f} dB | {layer.macs / 1e6:.2f} |")
    return "\n".join(lines)
