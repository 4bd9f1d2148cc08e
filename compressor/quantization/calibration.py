"""Streaming calibration: observers that see activations batch by batch.

Every observer keeps a fixed-size state (two floats, or a histogram of
`HistogramObserver.bins` bins that is re-binned when the range grows), so
memory does not depend on the number of calibration samples. `collect` runs
onnxruntime once over the data with the requested tensors exposed as outputs
and feeds each batch to that tensor's observer.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping

import numpy as np
import onnx
import onnx_ir as ir
from tqdm import tqdm

from compressor import ir as cir
from compressor import runtime
from compressor.data import Samples

METHODS = ("minmax", "moving_average", "percentile", "entropy", "mse")
# Input values per batch for runs that keep many intermediate tensors alive at once (224x224
# images: one per batch); activation memory grows with the input size. Calibration keeps one image per
# batch at 224x224 even when every observer reduces inside the model: 6 per batch calibrated ResNet-18
# 10% faster but raised ResNet-50's compile peak from 658 MB to 995 MB (quantize_static: 812 MB).
BATCH_INPUT_ELEMENTS = 2**17


class Observer(abc.ABC):
    """Sees one tensor's values over the calibration set and proposes a clipping range."""

    @abc.abstractmethod
    def update(self, values: np.ndarray) -> None:
        """Fold one batch of values into the state."""

    @abc.abstractmethod
    def range(self) -> tuple[float, float]:
        """The (low, high) range to quantize into; always contains 0."""

    def state_bytes(self) -> int:
        """Memory held by the observer's state (for the flat-memory guarantee)."""
        return sum(np.asarray(getattr(self, slot)).nbytes for slot in self.__slots__)


class MinMaxObserver(Observer):
    """The running minimum and maximum."""

    __slots__ = ("high", "low")

    def __init__(self) -> None:
        self.low, self.high = np.inf, -np.inf

    def update(self, values: np.ndarray) -> None:
        self.update_bounds(float(values.min()), float(values.max()))

    def update_bounds(self, low: float, high: float) -> None:
        """Fold in one batch's minimum and maximum (computed inside the model by `collect`)."""
        self.low = min(self.low, low)
        self.high = max(self.high, high)

    def range(self) -> tuple[float, float]:
        return _with_zero(self.low, self.high)


class MovingAverageObserver(Observer):
    """Exponential moving average of each batch's minimum and maximum."""

    __slots__ = ("high", "low", "momentum", "seen")

    def __init__(self, momentum: float = 0.9) -> None:
        self.low, self.high, self.momentum, self.seen = 0.0, 0.0, momentum, 0

    def update(self, values: np.ndarray) -> None:
        self.update_bounds(float(values.min()), float(values.max()))

    def update_bounds(self, low: float, high: float) -> None:
        """Fold in one batch's minimum and maximum (computed inside the model by `collect`)."""
        if self.seen == 0:
            self.low, self.high = low, high
        else:
            self.low = self.momentum * self.low + (1 - self.momentum) * low
            self.high = self.momentum * self.high + (1 - self.momentum) * high
        self.seen += 1

    def range(self) -> tuple[float, float]:
        return _with_zero(self.low, self.high)


class HistogramObserver(Observer):
    """A fixed-bin histogram over the running [min, max], re-binned as the range grows.

    ``method`` picks the range: ``percentile`` (two-tailed), ``entropy``
    (TensorRT's KL-divergence threshold search on |x|) or ``mse`` (the clipping
    that minimises expected quantization error for ``levels`` levels).
    """

    __slots__ = ("counts", "high", "levels", "low", "method", "percentile")

    bins = 2048

    def __init__(self, method: str = "percentile", percentile: float = 99.99, levels: int = 256) -> None:
        if method not in ("percentile", "entropy", "mse"):
            raise ValueError(f"unknown histogram method {method!r}")
        self.counts = np.zeros(self.bins, dtype=np.float64)
        self.low, self.high = 0.0, 0.0
        self.method, self.percentile, self.levels = method, percentile, levels

    def update(self, values: np.ndarray) -> None:
        values = values.ravel()
        low, high = min(self.low, float(values.min())), max(self.high, float(values.max()))
        if high <= low:
            return
        if (low, high) != (self.low, self.high):
            self.counts = _rebin(self.counts, self.low, self.high, low, high) if self.counts.any() else self.counts
            self.low, self.high = low, high
        self.counts += np.histogram(values, bins=self.bins, range=(low, high))[0]

    def range(self) -> tuple[float, float]:
        if not self.counts.any():
            return _with_zero(self.low, self.high)
        if self.method == "percentile":
            return self._percentile_range()
        if self.method == "mse":
            return self._mse_range()
        return self._entropy_range()

    def _edges(self) -> np.ndarray:
        return np.linspace(self.low, self.high, self.bins + 1)

    def _percentile_range(self) -> tuple[float, float]:
        cumulative = np.concatenate([[0.0], np.cumsum(self.counts)]) / self.counts.sum()
        tail = (100.0 - self.percentile) / 100.0
        low = np.interp(tail, cumulative, self._edges()) if self.low < 0 else 0.0
        high = np.interp(1.0 - tail, cumulative, self._edges())
        return _with_zero(float(low), float(high))

    def _mse_range(self) -> tuple[float, float]:
        centres = 0.5 * (self._edges()[:-1] + self._edges()[1:])
        best, best_error = (self.low, self.high), np.inf
        # Clip both tails at one magnitude t, on a geometric grid: a single far outlier
        # can put the best clip at a few % of the range.
        magnitude = max(abs(self.low), abs(self.high))
        for threshold in np.geomspace(0.01 * magnitude, magnitude, 120):
            low, high = _with_zero(max(self.low, -threshold), min(self.high, threshold))
            scale = (high - low) / (self.levels - 1)
            if scale <= 0:
                continue
            zero = np.round(-low / scale)
            q = np.clip(np.round(centres / scale) + zero, 0, self.levels - 1)
            error = float(np.sum(self.counts * (centres - (q - zero) * scale) ** 2))
            if error < best_error:
                best, best_error = (low, high), error
        return best

    def _entropy_range(self) -> tuple[float, float]:
        magnitude = max(abs(self.low), abs(self.high))
        edges = np.linspace(0.0, magnitude, self.bins + 1)
        cumulative = np.interp(edges, self._edges(), np.concatenate([[0.0], np.cumsum(self.counts)]))
        below = np.interp(-edges, self._edges(), np.concatenate([[0.0], np.cumsum(self.counts)]))
        hist = np.diff(cumulative) + np.maximum(-np.diff(below), 0.0)  # |x| histogram, both tails folded
        # The spike of exact zeros after ReLU would dominate the divergence and pull the
        # threshold far down; flatten it, as pytorch-quantization's skip_zeros does.
        hist[0] = min(hist[0], hist[1])
        # A non-negative tensor gets every level of an unsigned type; a signed one half on each side.
        threshold = _kl_threshold(hist, edges, target_bins=self.levels if self.low >= 0 else self.levels // 2)
        return _with_zero(max(self.low, -threshold), min(self.high, threshold))


class ChannelMeanObserver(Observer):
    """Running per-channel mean on ``axis`` (sum and count: fixed-size state).

    Wraps the tensor's range observer, if it has one, so one calibration run feeds both.
    """

    __slots__ = ("axis", "count", "inner", "total")

    def __init__(self, axis: int = 1, inner: Observer | None = None) -> None:
        self.axis, self.count, self.total, self.inner = axis, 0, np.zeros(0), inner

    def update(self, values: np.ndarray) -> None:
        if self.inner is not None:
            self.inner.update(values)
        values = np.asarray(values)
        axis = self.axis % values.ndim
        others = tuple(a for a in range(values.ndim) if a != axis)
        self.update_means(values.mean(axis=others, dtype=np.float64), values.size // values.shape[axis])

    def update_means(self, means: np.ndarray, count: int) -> None:
        """Fold in one batch's per-channel means over ``count`` positions (computed inside the model)."""
        if self.count == 0:
            self.total = np.zeros(len(means), np.float64)
        self.total += np.asarray(means, np.float64) * count
        self.count += count

    def range(self) -> tuple[float, float]:
        return self.inner.range() if self.inner is not None else (0.0, 0.0)

    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    def state_bytes(self) -> int:
        return self.total.nbytes + (self.inner.state_bytes() if self.inner is not None else 0)


def _kl_threshold(hist: np.ndarray, edges: np.ndarray, target_bins: int) -> float:
    """TensorRT's calibration: the |x| threshold whose quantized distribution is closest in KL."""
    best_threshold, best_kl = float(edges[-1]), np.inf
    total_bins = len(hist)
    for stop in range(target_bins, total_bins + 1, max(1, total_bins // 256)):
        reference = hist[:stop].copy()
        reference[-1] += hist[stop:].sum()
        if reference.sum() == 0:
            continue
        groups = np.array_split(np.arange(stop), target_bins)
        candidate = np.zeros(stop)
        for group in groups:
            occupied = hist[group] > 0
            if occupied.any():
                candidate[group[occupied]] = hist[group].sum() / occupied.sum()
        p = reference / reference.sum()
        q = candidate / max(candidate.sum(), 1e-12)
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best_kl:
            best_kl, best_threshold = kl, float(edges[stop])
    return best_threshold


def _rebin(counts: np.ndarray, old_low: float, old_high: float, low: float, high: float) -> np.ndarray:
    """Counts over [old_low, old_high] redistributed onto the same number of bins over [low, high]."""
    old_edges = np.linspace(old_low, old_high, len(counts) + 1)
    new_edges = np.linspace(low, high, len(counts) + 1)
    cumulative = np.interp(new_edges, old_edges, np.concatenate([[0.0], np.cumsum(counts)]))
    return np.diff(cumulative)


def _with_zero(low: float, high: float) -> tuple[float, float]:
    if not np.isfinite(low) or not np.isfinite(high):
        return 0.0, 0.0
    return min(low, 0.0), max(high, 0.0)


def make_observer(method: str, percentile: float = 99.99, levels: int = 256) -> Observer:
    """An observer for a calibration method name (see `METHODS`)."""
    if method == "minmax":
        return MinMaxObserver()
    if method == "moving_average":
        return MovingAverageObserver()
    if method in ("percentile", "entropy", "mse"):
        return HistogramObserver(method, percentile, levels)
    raise ValueError(f"unknown calibration method {method!r}; choose one of: {', '.join(METHODS)}")


def collect(
    model: ir.Model,
    dataset: Samples,
    observers: Mapping[str, Observer],
    *,
    num_samples: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
    keep_outputs: int = 0,
) -> list[np.ndarray]:
    """Run the model over ``dataset`` once and update each tensor's observer.

    Min/max observers (and per-channel means) are fed by reductions added to a
    copy of the model, so onnxruntime hands back a few numbers per tensor
    instead of the tensor; histogram observers get the whole tensor as an extra
    graph output. One batch is alive at a time.
    Returns the model's own outputs on the first ``keep_outputs`` samples (the
    float reference later checks compare against), one array per output.
    """
    proto, readers = _instrumented(model, observers)
    session = runtime.make_session(proto, options=runtime.session_options(many_outputs=True))
    del proto  # as large as the model; onnxruntime has its own copy
    names = [output.name for output in session.get_outputs()]
    model_outputs = [output.name for output in model.graph.outputs]
    kept: list[list[np.ndarray]] = [[] for _ in model_outputs]
    total = dataset.num_samples if num_samples is None else min(num_samples, dataset.num_samples)
    batches = dataset.batches(batch_size=batch_size, limit=total)
    bar = tqdm(total=total, unit="sample", desc="calibrating", disable=not progress, leave=False)
    seen = 0
    for batch in batches:
        outputs = {**batch.feeds, **dict(zip(names, runtime.run(session, batch.feeds), strict=True))}
        rows = next(iter(batch.feeds.values())).shape[0]
        for read in readers:
            read(outputs, rows)
        if seen < keep_outputs:
            for bucket, name in zip(kept, model_outputs, strict=True):
                bucket.append(outputs[name][: keep_outputs - seen])
        seen += rows
        bar.update(rows)
    bar.close()
    return [np.concatenate(bucket) for bucket in kept] if keep_outputs else []


Reader = Callable[[Mapping[str, np.ndarray], int], None]  # (this batch's outputs, samples in it)


def _instrumented(model: ir.Model, observers: Mapping[str, Observer]) -> tuple[onnx.ModelProto, list[Reader]]:
    """A copy of ``model`` that outputs what each observer needs, and one reader per observer."""
    proto = cir.to_proto(model)
    values = ir.convenience.create_value_mapping(model.graph)
    graph = proto.graph
    exposed = {o.name for o in graph.output} | {i.name for i in graph.input}
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)

    def output(name: str, dtype: int = onnx.TensorProto.FLOAT) -> str:
        if name not in exposed:
            graph.output.append(onnx.helper.make_tensor_value_info(name, dtype, None))
            exposed.add(name)
        return name

    def reduce(op: str, name: str, axes: list[int] | None = None, source: str | None = None) -> str:
        out = f"{name}__calibration_{op}"
        inputs, attributes = [source or name], {"keepdims": 0}
        if axes is not None and opset >= 18:
            constant = f"{out}_axes"
            graph.initializer.append(onnx.numpy_helper.from_array(np.array(axes, np.int64), constant))
            inputs.append(constant)
        elif axes is not None:
            attributes["axes"] = axes
        graph.node.append(onnx.helper.make_node(op, inputs, [out], name=out, **attributes))
        return output(out, _elem_type(values.get(name)))

    def pool(op: str, name: str) -> str:
        # onnxruntime pools its blocked conv layout in place, where a Reduce* first needs a reordered copy.
        out = f"{name}__calibration_{op}"
        graph.node.append(onnx.helper.make_node(op, [name], [out], name=out))
        return out

    readers: list[Reader] = []
    for name, observer in observers.items():
        bounds = observer.inner if isinstance(observer, ChannelMeanObserver) else observer
        value = values.get(name)
        rank = len(value.shape) if value is not None and value.shape is not None else None
        if _reads_whole_tensor(observer, value):
            full = output(name, _elem_type(value))
            readers.append(lambda outputs, rows, o=observer, n=full: o.update(outputs[n]))
            continue
        if bounds is not None:
            # Every range holds 0, so a Relu or Relu6 output's minimum need not be measured.
            low = None if _is_non_negative(value) else reduce("ReduceMin", name)
            pooled = pool("GlobalMaxPool", name) if _is_float_feature_map(value) else None
            readers.append(_bounds_reader(bounds, low, reduce("ReduceMax", name, source=pooled)))
        if isinstance(observer, ChannelMeanObserver):
            axis = observer.axis % rank
            pooled = pool("GlobalAveragePool", name) if axis == 1 and _is_float_feature_map(value) else None
            means = reduce("ReduceMean", name, [a for a in range(rank) if a != axis], source=pooled)
            readers.append(lambda outputs, rows, o=observer, m=means: o.update_means(outputs[m], rows))
    return proto, readers


def _reads_whole_tensor(observer: Observer | None, value: ir.Value | None) -> bool:
    """Whether ``observer`` needs the tensor itself as an output, rather than reductions of it."""
    if isinstance(observer, ChannelMeanObserver):
        return value is None or value.shape is None or _reads_whole_tensor(observer.inner, value)
    return not isinstance(observer, (MinMaxObserver, MovingAverageObserver, type(None)))


def _bounds_reader(observer: MinMaxObserver | MovingAverageObserver, low: str | None, high: str) -> Reader:
    def read(outputs: Mapping[str, np.ndarray], rows: int) -> None:
        observer.update_bounds(0.0 if low is None else float(outputs[low]), float(outputs[high]))

    return read


def _elem_type(value: ir.Value | None) -> int:
    """The ONNX element type of ``value`` (float where unknown): a reduction's output has its input's type."""
    return int(value.dtype) if value is not None and value.dtype is not None else onnx.TensorProto.FLOAT


def _is_non_negative(value: ir.Value | None) -> bool:
    """A Relu's output, or a Clip's with a constant minimum of at least 0."""
    producer = value.producer() if value is not None else None
    if producer is None or producer.domain not in ("", "ai.onnx"):
        return False
    if producer.op_type == "Clip" and len(producer.inputs) > 1 and producer.inputs[1] is not None:
        minimum = ir.convenience.get_const_tensor(producer.inputs[1])
        return minimum is not None and minimum.size == 1 and float(minimum.numpy().reshape(())) >= 0.0
    return producer.op_type == "Relu"


def _is_float_feature_map(value: ir.Value | None) -> bool:
    """Rank 3 or more (batch, channels, positions...) and a type onnxruntime's CPU pools (not double)."""
    if value is None or value.shape is None or len(value.shape) < 3:
        return False
    return value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16)
