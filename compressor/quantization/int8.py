"""The int8 QDQ rewrite shared by the quantize pass, the sensitivity analysis and the latency guard's variants.

`QuantizeInt8Config` (`int8_config`) is the whole int8 space (the recipe's int8 stage and the
tuner's search space). Calibration (`calibrate`) and rewriting
(`apply_quantization`) are separate, so one set of `CalibrationStats` serves
many variants of a model: the mixed-precision search and the latency guard
rebuild the model with different nodes in float from the same ranges.

Every quantized activation tensor gets one QuantizeLinear -> DequantizeLinear
pair right after its producer; weights become int8 initializers behind a
DequantizeLinear (per channel on the output-channel axis), biases int32 with
scale s_x * s_w.

Bias correction (Nagel et al. 2019, empirical form): weight rounding shifts
each output channel's mean by ``eps = (W_q - W) @ E[x]``; calibration also
records the per-channel mean of every compute node's input, and ``eps`` is
subtracted from the bias before the bias is quantized.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from compressor.data import Samples
from compressor.errors import ModelError
from compressor.instruments import stage
from compressor.ir import UniqueNames, add_initializer
from compressor.pipeline import PassContext
from compressor.quantization import calibration
from compressor.quantization.int8_config import STORAGE, QuantizeInt8Config
from compressor.quantization.params import (
    BIAS_CORRECTED_OPS,
    QuantParams,
    RoundedWeight,
    WeightMemo,
    activation_params,
    quantize_constant_input,
    quantize_node_weights,
    quantize_stored_input,
)
from compressor.quantization.plan import QUANTIZABLE_OPS, QuantizationPlan

REFERENCE_SAMPLES, REFERENCE_BYTES = 128, 64 * 2**20  # float outputs kept from calibration for later fp32 checks


@dataclass(frozen=True)
class CalibrationStats:
    """What calibration measured, reusable across variants of the same float model.

    ``ranges``: tensor name -> clipping range from the configured observer;
    ``means``: compute node input name -> per-channel mean (for bias correction);
    ``outputs``: the float model's outputs on the first calibration samples, so
    later checks against fp32 need not run it again (empty if too large to keep);
    ``weights``: quantized weights already computed for this model, by
    `quantize_node_weights`, so the ranking twins, the pass and its variants
    quantize each weight once;
    ``rounded``: weights whose rounding was optimised on this data (`compressor.quantization.rounding`),
    by weight name, used instead of rounding to nearest wherever their settings match.
    """

    ranges: Mapping[str, tuple[float, float]]
    means: Mapping[str, np.ndarray]
    samples: int
    outputs: tuple[np.ndarray, ...] = ()
    weights: WeightMemo = field(default_factory=dict, compare=False, repr=False)
    rounded: Mapping[str, RoundedWeight] = field(default_factory=dict, compare=False, repr=False)


# A mixed-precision policy: (float model, stats, config) -> {node name: why it stays in float}.
# The float model is a clone sharing its tensors: the chooser builds its variants by cloning it again.
FloatChooser = Callable[[ir.Model, CalibrationStats, QuantizeInt8Config], Mapping[str, str]]


def calibrate(model: ir.Model, dataset: Samples, config: QuantizeInt8Config) -> CalibrationStats:
    """Observe every tensor any variant of ``model`` may quantize (``keep_float`` ignored), in one data pass."""
    plan = QuantizationPlan.build(model.graph, replace(config, keep_float=frozenset()))
    levels = 256
    # Pass-through outputs too: a variant that keeps the pass-through op in float quantizes them on their own.
    observers: dict[str, calibration.Observer] = {
        name: calibration.make_observer(config.calibration, config.percentile, levels) for name in plan.tensors
    }
    means: dict[str, calibration.ChannelMeanObserver] = {}
    if config.bias_correction:
        for node in plan.compute:
            name = node.inputs[0].name
            if name not in means and node.op_type in BIAS_CORRECTED_OPS:
                means[name] = calibration.ChannelMeanObserver(1 if node.op_type == "Conv" else -1, observers.get(name))
                observers[name] = means[name]
    batch_size = dataset.batch_size_for(calibration.BATCH_INPUT_ELEMENTS, config.batch_size)
    with stage("calibration", announce=False):  # `collect` shows its own bar
        outputs = calibration.collect(
            model,
            dataset,
            observers,
            num_samples=config.num_samples,
            batch_size=batch_size,
            keep_outputs=_reference_samples(model),
            progress=PassContext.current().progress,
        )
    ranges = {name: obs.range() for name, obs in observers.items() if name in plan.tensors}
    samples = min(config.num_samples, dataset.num_samples)
    means_found = {name: obs.mean() for name, obs in means.items() if obs.count}
    return CalibrationStats(ranges, means_found, samples, tuple(outputs))


def _reference_samples(model: ir.Model) -> int:
    """How many samples of model outputs calibration keeps: `REFERENCE_SAMPLES`, or none if they are large."""
    per_sample = 0
    for output in model.graph.outputs:
        dims = list(output.shape)[1:] if output.shape is not None else [None]
        if not all(isinstance(d, int) for d in dims):
            return 0
        per_sample += int(np.prod(dims, dtype=np.int64)) * 4
    return REFERENCE_SAMPLES if per_sample * REFERENCE_SAMPLES <= REFERENCE_BYTES else 0


def quantizable_nodes(model: ir.Model, config: QuantizeInt8Config) -> tuple[list[tuple[str, str]], frozenset[str]]:
    """(name, op) of each compute node ``config`` quantizes, and the names of every node it may quantize.

    Unnamed nodes cannot be kept in float by name, so they are not listed.
    """
    plan = QuantizationPlan.build(model.graph, config)
    compute = [(node.name, node.op_type) for node in plan.compute if node.name]
    return compute, frozenset(node.name for node in model.graph if node.op_type in QUANTIZABLE_OPS and node.name)


@dataclass
class Applied:
    """What `apply_quantization` did: activation params, nodes left in float, bias corrections."""

    params: dict[str, QuantParams]
    skipped: dict[str, str]
    corrected: dict[str, float]


def apply_quantization(model: ir.Model, config: QuantizeInt8Config, stats: CalibrationStats) -> Applied:
    """Rewrite ``model`` in place into QDQ form with ranges (and means) from ``stats``."""
    graph = model.graph
    plan = QuantizationPlan.build(graph, config)
    missing = [name for name in plan.observed() if name not in stats.ranges]
    if missing:
        raise ModelError(f"calibration statistics lack tensor(s) {', '.join(missing[:3])}: recalibrate this model")
    params = {name: activation_params(*stats.ranges[name], config) for name in plan.observed()}
    for alias, source in plan.shared.items():
        params[alias] = params[source]
    inputs = [(params[node.inputs[0].name], stats.means.get(node.inputs[0].name)) for node in plan.compute]
    names = UniqueNames(graph)
    _insert_qdq(graph, plan, params, names)
    for node in plan.quantized:
        for index, value in enumerate(node.inputs if node.op_type == "Add" else ()):
            if value is not None and value.const_value is not None and value.dtype == ir.DataType.FLOAT:
                quantize_constant_input(graph, node, index, config, names)
    corrected: dict[str, float] = {}
    for node, index, axis in plan.stored:
        quantize_stored_input(graph, node, index, axis, STORAGE, names)
    for node, (input_params, mean) in zip(plan.compute, inputs, strict=True):
        mean = mean if config.bias_correction else None
        shift = quantize_node_weights(graph, node, input_params, config, mean, names, stats.weights, stats.rounded)
        if shift is not None:
            corrected[node.name or node.op_type] = shift
    RemoveUnusedNodesPass()(model)  # drops the float weights the int8 ones replaced
    return Applied(params, plan.skipped, corrected)


def _insert_qdq(graph: ir.Graph, plan: QuantizationPlan, params: dict[str, QuantParams], names: UniqueNames) -> None:
    quantized_ids = {id(n) for n in plan.quantized}
    for name, value in plan.tensors.items():
        p = params[name]
        scale = add_initializer(graph, f"{name}_scale", np.array(p.scale, dtype=np.float32), names)
        zero = add_initializer(graph, f"{name}_zero_point", np.array(p.zero_point, dtype=p.dtype), names)
        quantize = ir.Node("", "QuantizeLinear", [value, scale, zero], name=f"{name}_quantize")
        quantize.outputs[0].name = names.fresh(f"{name}_quantized")
        dequantize = ir.Node("", "DequantizeLinear", [quantize.outputs[0], scale, zero], name=f"{name}_dequantize")
        dequantize.outputs[0].name = names.fresh(f"{name}_dequantized")
        for use in list(value.uses()):
            if id(use.node) in quantized_ids or id(use.node) in plan.readers:
                use.node.replace_input_with(use.idx, dequantize.outputs[0])
        producer = value.producer()
        if producer is None:
            graph.insert_before(next(iter(graph)), [quantize, dequantize])
        else:
            graph.insert_after(producer, [quantize, dequantize])
