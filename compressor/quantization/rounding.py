"""Rounding optimisation over a model: AdaRound (`adaround`) layer by layer, in topological order.

Each compute layer is rounded against what it receives in the quantized
model: the layers before it already use their optimised integers, so an
upstream layer's error is what the next one learns to absorb instead of
compounding. Layers run in *waves*: a wave is a run of layers, in graph
order, none of which feeds another; one pass over the calibration data per
wave runs the float model and the quantized model so far, both cut at the
wave's inputs, and streams each layer's input patches (Conv) or rows
(Gemm, MatMul) into its `LayerMoments`. Memory is one batch of activations
plus ``K x K`` moments per layer.

A layer keeps rounding to nearest where AdaRound cannot help, and its
record says why: too few calibration rows for its fan-in (the problem is
then underdetermined and overfits), an op or attribute it does not
handle, a weight shared by several nodes, a diverging optimisation, or no
gain on the calibration data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx_ir.passes.common import RemoveUnusedNodesPass
from tqdm import tqdm

from compressor import runtime
from compressor.data import Samples
from compressor.quantization.adaround import LayerMoments, LayerProblem, RoundingSettings, round_layer
from compressor.quantization.calibration import BATCH_INPUT_ELEMENTS
from compressor.quantization.int8 import apply_quantization
from compressor.quantization.params import RoundedWeight, quantize_weight, weight_limits, weight_settings
from compressor.quantization.plan import QuantizationPlan

if TYPE_CHECKING:
    from compressor.quantization.int8 import CalibrationStats
    from compressor.quantization.int8_config import QuantizeInt8Config


# Output positions a Conv's moments read per sample (chosen at random): thousands of rows per sample
# add little to ``K x K`` moments but cost time and memory at 112x112.
MAX_POSITIONS = 256
# ...and fewer where fewer suffice: moments from this many rows per input (a depthwise 5x5 has 25) and
# at least `MIN_ROWS`; more rows cost time in proportion and moved no layer's result measurably.
ROWS_PER_INPUT, MIN_ROWS = 64, 4096
# Inputs per output a layer may have to be rounded: its moments hold 3 K x K float64 matrices (127 MB at
# 2304 = 256 x 3 x 3) and each step costs outputs x K^2; wider layers (ResNet's last 3x3 stage) keep nearest.
MAX_FAN_IN = 2304


@dataclass(frozen=True)
class LayerRecord:
    """One layer's outcome: its output SQNR on the calibration data with nearest rounding and after."""

    node: str
    op: str
    rows: int  # calibration rows (patches or samples) its moments saw
    fan_in: int
    sqnr_nearest_db: float
    sqnr_db: float
    outcome: str  # "adaround", or why it kept rounding to nearest

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class RoundingResult:
    """Optimised weights by weight name (`CalibrationStats.rounded`) and a record per layer, in graph order."""

    weights: Mapping[str, RoundedWeight]
    records: list[LayerRecord]
    samples: int

    def underdetermined(self) -> list[LayerRecord]:
        return [r for r in self.records if r.outcome.startswith("nearest: too few")]


def optimize_rounding(
    model: ir.Model, dataset: Samples, config: QuantizeInt8Config, stats: CalibrationStats, progress: bool = False
) -> RoundingResult:
    """AdaRound every compute layer ``config`` quantizes in the float ``model`` (not modified)."""
    settings = RoundingSettings(
        iterations=config.rounding_iterations, refit_bias=config.rounding_bias, refit_scale=config.rounding_scale
    )
    plan = QuantizationPlan.build(model.graph, config)
    layers: list[_Layer] = []
    records: dict[str, LayerRecord] = {}
    for node in plan.compute:
        layer = _Layer.of(node)
        if isinstance(layer, _Layer) and layer.fan_in > MAX_FAN_IN:
            layer = f"nearest: fan-in {layer.fan_in} is above {MAX_FAN_IN} (its moments grow with the square)"
        if isinstance(layer, _Layer):
            layers.append(layer)
        elif node.name:
            records[node.name] = LayerRecord(node.name, node.op_type, 0, 0, float("nan"), float("nan"), layer)
    samples = min(config.num_samples, dataset.num_samples)
    # 4 images at 224x224 a batch: one image took 83 s on EfficientNet-Lite0 (354 MB peak), four 70 s (401 MB).
    batch_size = dataset.batch_size_for(4 * BATCH_INPUT_ELEMENTS, config.batch_size)
    rounded: dict[str, RoundedWeight] = {}
    bar = tqdm(total=len(layers), unit="layer", desc="rounding", disable=not progress, leave=False)
    for index, wave in enumerate(_waves(model, layers)):
        current = replace(stats, rounded=dict(rounded))
        moments = _stream_moments(model, wave, dataset, config, current, samples, batch_size, index)
        for layer in wave:
            record, weight = layer.round(moments[layer.name], config, settings)
            records[layer.name] = record
            if weight is not None:
                rounded[layer.weight_name] = weight
            bar.update(1)
    bar.close()
    order = [node.name for node in plan.compute if node.name in records]
    return RoundingResult(rounded, [records[name] for name in order], samples)


@dataclass(frozen=True)
class _Layer:
    """A compute node's geometry as a dot product: ``groups`` x (``outputs`` channels over ``fan_in`` inputs)."""

    name: str
    op: str
    weight_name: str
    weight: np.ndarray
    groups: int
    fan_in: int
    transposed: bool  # weight stored [K, N] (MatMul, Gemm transB=0)
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()  # begin..., end...
    dilations: tuple[int, ...] = ()

    @classmethod
    def of(cls, node: ir.Node) -> _Layer | str:
        """The layer, or why rounding leaves it at nearest."""
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        if not node.name or weight is None or weight.const_value is None:
            return "nearest: no constant weight"
        if len(weight.uses()) > 1:
            return "nearest: its weight is shared with another node"
        array = weight.const_value.numpy().astype(np.float32)
        attrs = node.attributes
        if node.op_type == "Conv":
            if array.ndim not in (3, 4):
                return f"nearest: {array.ndim - 2}-d Conv is not handled by rounding"
            if "auto_pad" in attrs and attrs["auto_pad"].as_string() not in ("NOTSET", ""):
                return "nearest: Conv with auto_pad is not handled by rounding"
            spatial = array.ndim - 2
            groups = attrs["group"].as_int() if "group" in attrs else 1
            return cls(node.name, node.op_type, weight.name, array, groups, int(np.prod(array.shape[1:])), False,
                       tuple(array.shape[2:]), _ints(attrs, "strides", (1,) * spatial),
                       _ints(attrs, "pads", (0,) * 2 * spatial), _ints(attrs, "dilations", (1,) * spatial))  # fmt: skip
        if array.ndim != 2:
            return f"nearest: {node.op_type} with a {array.ndim}-d weight is not handled by rounding"
        if node.op_type == "Gemm":
            floats = {key: attrs[key].as_float() for key in ("alpha", "beta") if key in attrs}
            if (attrs["transA"].as_int() if "transA" in attrs else 0) or any(v != 1.0 for v in floats.values()):
                return "nearest: Gemm with transA, alpha or beta is not handled by rounding"
            transposed = not (attrs["transB"].as_int() if "transB" in attrs else 0)
            return cls(node.name, node.op_type, weight.name, array, 1, array.shape[0 if transposed else 1], transposed)
        if node.op_type == "MatMul":
            return cls(node.name, node.op_type, weight.name, array, 1, array.shape[0], True)
        return f"nearest: {node.op_type} is not handled by rounding"

    def rows(
        self, pair: tuple[np.ndarray, np.ndarray], rng: np.random.Generator, limit: int = MAX_POSITIONS
    ) -> list[np.ndarray]:
        """The layer's inputs (quantized, float) as paired rows ``[G, P, K]``: a Conv's patches, a Gemm's rows.

        A Conv reads at most ``limit`` output positions per sample, the same random ones in
        both: a 112x112 map holds far more rows than its moments need.
        """
        if self.op != "Conv":
            return [np.asarray(x, np.float32).reshape(1, -1, self.fan_in) for x in pair]
        spatial = len(self.kernel)
        begin, end = self.pads[:spatial], self.pads[spatial:]
        sizes = pair[0].shape[2:]
        grid = [(n + b + e - d * (k - 1) - 1) // s + 1
                for n, b, e, d, k, s in zip(sizes, begin, end, self.dilations, self.kernel, self.strides, strict=True)]
        positions = int(np.prod(grid))
        chosen = np.arange(positions) if positions <= limit else rng.choice(positions, limit, replace=False)
        starts = np.unravel_index(np.sort(chosen), grid)  # per spatial axis: [S]
        offsets = np.indices(self.kernel).reshape(spatial, -1)  # per spatial axis: [k]
        # Each tap's coordinates in the unpadded input; taps in the padding read zero.
        coords = [start[:, None] * s + offset[None, :] * d - b
                  for start, offset, s, d, b in zip(starts, offsets, self.strides, self.dilations, begin, strict=True)]
        inside = np.logical_and.reduce([(c >= 0) & (c < n) for c, n in zip(coords, sizes, strict=True)])
        flat = np.ravel_multi_index([np.clip(c, 0, n - 1) for c, n in zip(coords, sizes, strict=True)], sizes)
        rows = []
        for x in pair:
            x = np.asarray(x, np.float32)
            batch, channels = x.shape[:2]
            # One gather straight into [G, N, S, k, Cg] (taps outer, channels inner, as `grouped` orders K).
            view = x.reshape(batch, self.groups, channels // self.groups, -1).transpose(1, 0, 3, 2)
            patches = view[:, :, flat, :]
            if not inside.all():
                patches *= inside[..., None]
            rows.append(patches.reshape(self.groups, -1, self.fan_in))
        return rows

    def positions_per_sample(self, samples: int) -> int:
        """Conv positions to read per sample for `ROWS_PER_INPUT` rows per input in all (at most `MAX_POSITIONS`)."""
        wanted = max(ROWS_PER_INPUT * self.fan_in, MIN_ROWS)
        return int(min(MAX_POSITIONS, max(1, -(-wanted // max(samples, 1)))))

    def grouped(self, array: np.ndarray) -> np.ndarray:
        """A weight-shaped array as ``[G, O, K]``; a Conv's K runs over its taps, then its input channels."""
        if self.op != "Conv":
            return (array.T if self.transposed else array).reshape(1, -1, self.fan_in)
        out_channels, per_group = array.shape[:2]
        taps = array.reshape(out_channels, per_group, -1).transpose(0, 2, 1)
        return taps.reshape(self.groups, out_channels // self.groups, self.fan_in)

    def ungrouped(self, array: np.ndarray) -> np.ndarray:
        """The inverse of `grouped`: ``[G, O, K]`` back to the weight's own shape."""
        if self.op != "Conv":
            matrix = array.reshape(-1, self.fan_in)
            return matrix.T if self.transposed else matrix
        out_channels, per_group = self.weight.shape[:2]
        taps = array.reshape(out_channels, -1, per_group).transpose(0, 2, 1)
        return taps.reshape(self.weight.shape)

    def round(
        self, moments: LayerMoments, config: QuantizeInt8Config, settings: RoundingSettings
    ) -> tuple[LayerRecord, RoundedWeight | None]:
        """Round this layer on ``moments``: its record, and its weights unless nearest rounding is kept."""
        axis = 1 if self.transposed else 0  # the output channels, as `weight_channel_axis` says
        _, scale, zero = quantize_weight(self.weight, axis, config)
        out_channels = self.weight.shape[axis]
        qmin, qmax = weight_limits(config)
        problem = LayerProblem(
            self.grouped(self.weight),
            np.broadcast_to(scale, (out_channels,)).reshape(self.groups, -1),
            np.broadcast_to(zero, (out_channels,)).reshape(self.groups, -1).astype(np.float32),
            qmin,
            qmax,
            shared_scale=scale.size == 1 or config.power_of_two,
        )
        if moments.rows < self.fan_in:
            why = f"nearest: too few calibration rows ({moments.rows}) for its {self.fan_in} inputs"
            return LayerRecord(self.name, self.op, moments.rows, self.fan_in, float("nan"), float("nan"), why), None
        result = round_layer(problem, moments, settings)
        record = LayerRecord(self.name, self.op, moments.rows, self.fan_in, result.sqnr_nearest_db, result.sqnr_db,
                             result.outcome)  # fmt: skip
        if result.outcome != "adaround" and not settings.refit_bias and not settings.refit_scale:
            return record, None
        integers = self.ungrouped(result.q)
        new_scale = result.scale.reshape(-1) if not problem.shared_scale else scale
        weight = RoundedWeight(weight_settings(config), integers.astype(np.int8), new_scale.astype(np.float32),
                               zero, result.bias_shift)  # fmt: skip
        return record, weight


def _waves(model: ir.Model, layers: list[_Layer]) -> list[list[_Layer]]:
    """``layers`` cut into runs, in graph order, where no layer of a run depends on another of the same run."""
    by_name = {layer.name: layer for layer in layers}
    upstream: dict[int, frozenset[str]] = {}  # node id -> names of the layers it depends on
    for node in model.graph:
        found: set[str] = set()
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None:
                found |= upstream.get(id(producer), frozenset())
                if producer.name in by_name:
                    found.add(producer.name)
        upstream[id(node)] = frozenset(found)
    nodes = {node.name: node for node in model.graph if node.name in by_name}
    waves: list[list[_Layer]] = []
    for layer in layers:
        if waves and not upstream[id(nodes[layer.name])] & {other.name for other in waves[-1]}:
            waves[-1].append(layer)
        else:
            waves.append([layer])
    return waves


def _stream_moments(
    model: ir.Model,
    wave: list[_Layer],
    dataset: Samples,
    config: QuantizeInt8Config,
    stats: CalibrationStats,
    samples: int,
    batch_size: int,
    seed: int,
) -> dict[str, LayerMoments]:
    """Each wave layer's `LayerMoments` from one pass of the float and the quantized model over the data."""
    quantized = model.clone()
    apply_quantization(quantized, config, stats)
    q_session, q_names = _cut(quantized, wave)
    f_session, f_names = _cut(model.clone(), wave)
    moments = {layer.name: LayerMoments(layer.groups, layer.fan_in) for layer in wave}
    rng = np.random.default_rng(seed)
    for batch in dataset.batches(batch_size=batch_size, limit=samples):
        q_values = _outputs(q_session, batch.feeds)
        f_values = _outputs(f_session, batch.feeds)
        for layer in wave:
            pair = (q_values[q_names[layer.name]], f_values[f_names[layer.name]])
            moments[layer.name].update(*layer.rows(pair, rng, layer.positions_per_sample(samples)))
    for layer_moments in moments.values():
        layer_moments.flush()
    return moments


def _ints(attributes: Mapping[str, ir.Attr], key: str, default: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(attributes[key].as_ints()) if key in attributes else default


def _cut(model: ir.Model, wave: list[_Layer]) -> tuple[ort.InferenceSession | None, dict[str, str]]:
    """A session computing the wave layers' inputs in ``model`` (None if all are graph inputs), and their names."""
    nodes = {node.name: node for node in model.graph}
    names = {layer.name: nodes[layer.name].inputs[0].name for layer in wave}
    graph = model.graph
    wanted = [nodes[layer.name].inputs[0] for layer in wave]
    graph.outputs.clear()
    for value in dict.fromkeys(wanted):
        if not value.is_graph_input():
            graph.outputs.append(value)
    if not graph.outputs:
        return None, names
    RemoveUnusedNodesPass()(model)
    options = runtime.session_options(many_outputs=True)
    return runtime.make_session(model, options=options), names


def _outputs(session: ort.InferenceSession | None, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    values = dict(feeds)
    if session is not None:
        names = [output.name for output in session.get_outputs()]
        values.update(zip(names, runtime.run(session, feeds), strict=True))
    return values
