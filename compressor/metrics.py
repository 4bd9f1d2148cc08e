"""Measurements: fidelity between outputs, accuracy, size, MACs/params and latency."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from compressor import ir as cir

if TYPE_CHECKING:
    from compressor.pipeline import Tolerance


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of ``test`` against ``reference``, in dB (inf if equal)."""
    reference = np.asarray(reference, dtype=np.float64)
    noise = float(np.sum((reference - np.asarray(test, dtype=np.float64)) ** 2))
    signal = float(np.sum(reference**2))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * np.log10(signal / noise)


def top1_agreement(reference: np.ndarray, test: np.ndarray) -> float:
    """Fraction of samples whose arg-max class matches between two logit arrays [N, C]."""
    return float(np.mean(np.argmax(reference, axis=-1) == np.argmax(test, axis=-1)))


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose arg-max class equals the label."""
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


@dataclass(frozen=True)
class Comparison:
    """How far one set of model outputs is from a reference set."""

    max_abs_error: float
    max_relative_error: float
    sqnr_db: float
    top1_agreement: float | None

    def violation(self, tolerance: Tolerance) -> str | None:
        """A description of the first bound broken, or None if within tolerance."""
        if tolerance.max_relative_error is not None and self.max_relative_error > tolerance.max_relative_error:
            return f"max relative error {self.max_relative_error:.3g} > {tolerance.max_relative_error:g}"
        if tolerance.min_sqnr_db is not None and self.sqnr_db < tolerance.min_sqnr_db:
            return f"SQNR {self.sqnr_db:.1f} dB < {tolerance.min_sqnr_db:g} dB"
        if (
            tolerance.min_top1_agreement is not None
            and self.top1_agreement is not None
            and self.top1_agreement < tolerance.min_top1_agreement
        ):
            return f"top-1 agreement {self.top1_agreement:.3f} < {tolerance.min_top1_agreement:g}"
        return None

    def as_dict(self) -> dict[str, float]:
        values = {
            "max_abs_error": self.max_abs_error,
            "max_relative_error": self.max_relative_error,
            "sqnr_db": self.sqnr_db,
        }
        if self.top1_agreement is not None:
            values["top1_agreement"] = self.top1_agreement
        return values


def compare_outputs(reference: Sequence[np.ndarray], test: Sequence[np.ndarray]) -> Comparison:
    """Compare output lists; errors are relative to the largest reference magnitude."""
    if len(reference) != len(test):
        raise ValueError(f"output count changed: {len(reference)} -> {len(test)}")
    max_abs, max_rel, signal, noise = 0.0, 0.0, 0.0, 0.0
    for ref, out in zip(reference, test, strict=True):
        if ref.shape != out.shape:
            raise ValueError(f"output shape changed: {ref.shape} -> {out.shape}")
        ref64, out64 = np.asarray(ref, np.float64), np.asarray(out, np.float64)
        diff = float(np.max(np.abs(ref64 - out64))) if ref.size else 0.0
        scale = float(np.max(np.abs(ref64))) if ref.size else 0.0
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
        signal += float(np.sum(ref64**2))
        noise += float(np.sum((ref64 - out64) ** 2))
    sqnr = float("inf") if noise == 0 else 10.0 * np.log10(signal / noise) if signal > 0 else float("-inf")
    first = reference[0] if reference else None
    agreement = top1_agreement(first, test[0]) if first is not None and first.ndim == 2 and first.shape[1] > 1 else None
    return Comparison(max_abs, max_rel, sqnr, agreement)


def model_size_bytes(model: ir.Model | onnx.ModelProto) -> int:
    """Serialized size in bytes, weights included (external weights counted too)."""
    if isinstance(model, onnx.ModelProto):
        return model.ByteSize()
    if cir.weight_bytes(model) > cir.EXTERNAL_DATA_THRESHOLD_BYTES:
        return cir.weight_bytes(model)
    return cir.to_proto(model).ByteSize()


@dataclass(frozen=True)
class ComputeCost:
    """Multiply-accumulates at batch 1 (Conv, ConvTranspose, Gemm, MatMul) and parameter count."""

    macs: int
    params: int


def compute_cost(
    model: ir.Model | onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> ComputeCost:
    """Count MACs at batch 1 and parameters.

    Symbolic (and negative) input dims take their size from ``input_shapes`` (input name -> dims,
    the batch set to 1), else 1, on a copy for shape inference only; the model itself is untouched.
    """
    proto = cir.to_proto(model) if isinstance(model, ir.Model) else model
    params = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    shapes, inferred = _mac_shapes(proto, input_shapes or {})
    macs = sum(_node_macs(node, shapes) for node in inferred.graph.node)
    return ComputeCost(macs=int(macs), params=int(params))


def layer_shapes(
    model: ir.Model | onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> dict[str, tuple[int, ...]]:
    """Static shapes (batch 1) of the tensors `compute_cost` counts MACs from, by value name."""
    proto = cir.to_proto(model) if isinstance(model, ir.Model) else model
    return _mac_shapes(proto, input_shapes or {})[0]


def _mac_shapes(
    proto: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]
) -> tuple[dict[str, tuple[int, ...]], onnx.ModelProto]:
    skeleton = _without_weight_data(proto, input_shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, data_prop=True)
    except Exception:  # noqa: BLE001 - shape inference is best effort for a metric
        inferred = skeleton
    shapes = _known_shapes(inferred.graph)
    missing = [n.output[0] for n in inferred.graph.node if n.op_type in MAC_OPS and n.output[0] not in shapes]
    if missing:  # ONNX shape inference stops at contrib ops (QLinearAdd, QGemm, ...): ask onnxruntime
        names = [i for n in proto.graph.node if n.op_type in MAC_OPS for i in n.input]
        shapes.update(_shapes_by_running(proto, names, input_shapes))
    return shapes, inferred


SMALL_INITIALIZER_ELEMENTS = 64


def _without_weight_data(proto: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """A batch-1 copy of ``proto`` with its weights as typed graph inputs: shape inference needs their shapes.

    Built field by field so the weight bytes are never copied. Integer and small
    initializers stay, since shapes may be computed from them (Reshape targets,
    Slice bounds, Resize scales).
    """
    skeleton = onnx.ModelProto(ir_version=proto.ir_version)
    skeleton.opset_import.extend(proto.opset_import)
    skeleton.functions.extend(proto.functions)
    source, graph = proto.graph, skeleton.graph
    graph.node.extend(source.node)
    graph.input.extend(source.input)
    graph.output.extend(source.output)
    graph.value_info.extend(source.value_info)
    _set_symbolic_dims(graph, shapes)
    inputs = {i.name for i in graph.input}
    for tensor in source.initializer:
        shape_data = tensor.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
        if shape_data or int(np.prod(tensor.dims)) <= SMALL_INITIALIZER_ELEMENTS:
            graph.initializer.append(tensor)
        elif tensor.name not in inputs:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    return skeleton


def _set_symbolic_dims(graph: onnx.GraphProto, shapes: Mapping[str, Sequence[int]] | None = None) -> None:
    """Fix every symbolic dim of the graph's data inputs (not initializer-backed ones): from ``shapes``, else 1."""
    initializer_names = {t.name for t in graph.initializer}
    for graph_input in graph.input:
        if graph_input.name in initializer_names:
            continue
        given = (shapes or {}).get(graph_input.name)
        for axis, dim in enumerate(graph_input.type.tensor_type.shape.dim):
            if not dim.HasField("dim_value") or dim.dim_value < 0:
                dim.Clear()
                dim.dim_value = given[axis] if given is not None and axis else 1


MAC_OPS = frozenset({"Conv", "QLinearConv", "ConvInteger", "ConvTranspose", "Gemm", "MatMul", "QLinearMatMul",
                     "MatMulInteger", "QGemm"})  # fmt: skip


def _shapes_by_running(
    proto: onnx.ModelProto, names: Sequence[str], input_shapes: Mapping[str, Sequence[int]]
) -> dict[str, tuple[int, ...]]:
    """Shapes of the MAC ops' inputs and outputs from one onnxruntime run on zeros (batch 1)."""
    probe = onnx.ModelProto.FromString(proto.SerializeToString())
    _set_symbolic_dims(probe.graph, input_shapes)
    wanted = {n for n in names if n} | {n.output[0] for n in probe.graph.node if n.op_type in MAC_OPS}
    initializer_names = {t.name for t in probe.graph.initializer}
    wanted -= initializer_names | {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in sorted(wanted))
    feeds = {}
    for graph_input in probe.graph.input:
        if graph_input.name in initializer_names:
            continue
        tensor_type = graph_input.type.tensor_type
        dims = [d.dim_value for d in tensor_type.shape.dim]
        feeds[graph_input.name] = np.zeros(dims, dtype=onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    try:
        session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        outputs = session.run(None, feeds)
    except Exception:  # noqa: BLE001 - a metric must not fail the run; unknown shapes count 0 MACs
        return {}
    return {o.name: tuple(v.shape) for o, v in zip(session.get_outputs(), outputs, strict=True)}


def _known_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {t.name: tuple(t.dims) for t in graph.initializer}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        dims = info.type.tensor_type.shape.dim
        if info.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[info.name] = tuple(d.dim_value for d in dims)
    return shapes


def _node_macs(node: onnx.NodeProto, shapes: Mapping[str, tuple[int, ...]]) -> int:
    inputs = [shapes.get(name) for name in node.input]
    output = shapes.get(node.output[0]) if node.output else None
    if node.op_type in ("Conv", "QLinearConv", "ConvInteger"):
        weight = inputs[3 if node.op_type == "QLinearConv" else 1]
        if weight is None or output is None:
            return 0
        return int(np.prod(output)) * int(np.prod(weight[1:]))
    if node.op_type == "ConvTranspose":
        if inputs[0] is None or inputs[1] is None:
            return 0
        # weight is [C_in, C_out / group, k...]: every input element feeds C_out/group * k outputs.
        return int(np.prod(inputs[0])) * int(np.prod(inputs[1][1:]))
    if node.op_type in ("Gemm", "MatMul", "QLinearMatMul", "MatMulInteger", "QGemm"):
        a = inputs[0]
        if a is None or output is None:
            return 0
        trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
        k = a[-2] if (node.op_type in ("Gemm", "QGemm") and trans_a) else a[-1]
        return int(np.prod(output)) * int(k)
    return 0


@dataclass(frozen=True)
class Latency:
    """Median and spread of per-run latency in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int


def interleaved_latency(
    sessions: Sequence[ort.InferenceSession],
    feeds: Mapping[str, np.ndarray],
    runs: int = 20,
    warmup: int = 3,
) -> list[Latency]:
    """Time several sessions A/B-interleaved on the same feeds.

    Interleaving spreads machine noise evenly over the sessions, so their ratio
    is meaningful on a busy machine. Create the sessions with spinning off.
    """
    prepared = [{i.name: feeds[i.name] for i in s.get_inputs()} for s in sessions]
    for _ in range(warmup):
        for session, feed in zip(sessions, prepared, strict=True):
            session.run(None, feed)
    samples: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for session, feed, bucket in zip(sessions, prepared, samples, strict=True):
            start = time.perf_counter()
            session.run(None, feed)
            bucket.append((time.perf_counter() - start) * 1e3)
    return [_summary(bucket) for bucket in samples]


def _summary(bucket: list[float]) -> Latency:
    deciles = statistics.quantiles(bucket, n=10) if len(bucket) > 1 else [bucket[0]] * 9
    return Latency(statistics.median(bucket), deciles[0], deciles[-1], len(bucket))


def one_at_a_time_latency(
    factories: Sequence[Callable[[], ort.InferenceSession]],
    feeds: Mapping[str, np.ndarray],
    runs: int = 20,
    rounds: int = 3,
    warmup: int = 3,
) -> list[Latency]:
    """Time sessions with no other session alive: each round builds each one, warms it up, times it, drops it.

    For onnxruntime's default options (spinning on), whose idle worker threads
    keep spinning after a run: beside a second live session they take the cores
    it needs (the same model timed against itself read 0.67x to 1.15x that way).
    The rounds alternate the models, so slow drift of the machine hits both alike.
    """
    per_round = -(-runs // rounds)
    samples: list[list[float]] = [[] for _ in factories]
    for _ in range(rounds):
        for factory, bucket in zip(factories, samples, strict=True):
            session = factory()
            feed = {i.name: feeds[i.name] for i in session.get_inputs()}
            for _ in range(warmup):
                session.run(None, feed)
            for _ in range(per_round):
                start = time.perf_counter()
                session.run(None, feed)
                bucket.append((time.perf_counter() - start) * 1e3)
            del session  # its threads go with it, before the next session starts
    return [_summary(bucket) for bucket in samples]
