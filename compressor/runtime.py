"""onnxruntime plumbing shared by the instruments, metrics and backends.

Kept in the core (not in `backends/`) because the pipeline's numerics check
needs a reference runtime and dependencies only point from backends to core.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from compressor import ir as cir
from compressor.errors import DataError, ModelError, UsageError

DEFAULT_THREADS = 2
# Models with more weight bytes than this reach onnxruntime through a temporary file (see `make_session`).
FILE_SESSION_MIN_BYTES = 4 * 2**20


@dataclass(frozen=True)
class InputSpec:
    """A graph input: its name, numpy dtype and shape (str for symbolic dims, None for unknown)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]

    def concrete_shape(self, batch: int) -> tuple[int, ...]:
        """Shape with the leading symbolic dim set to ``batch``; other symbolic dims must be known."""
        dims: list[int] = []
        for axis, dim in enumerate(self.shape):
            if isinstance(dim, int):
                dims.append(dim)
            elif axis == 0:
                dims.append(batch)
            else:
                raise DataError(
                    f"input '{self.name}' has a symbolic dimension {dim!r} at axis {axis}; "
                    f"pass --calib or --eval data, or --input-shape {self.name}=... so its size is known"
                )
        return tuple(dims)

    @property
    def symbolic_axes(self) -> list[int]:
        """Axes after the batch whose size the model leaves open."""
        return [axis for axis, dim in enumerate(self.shape) if axis and not isinstance(dim, int)]


def input_specs(model: ir.Model, shapes: Mapping[str, Sequence[int]] | None = None) -> list[InputSpec]:
    """The model's real inputs (initializers listed as inputs are skipped).

    ``shapes`` fixes the sizes the model leaves symbolic (``--input-shape``), by input name; the key
    ``""`` names the only input. Negative sizes (``-1``, as some exporters write) count as symbolic.
    """
    specs = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        if value.dtype is None or value.shape is None:
            raise DataError(f"input '{value.name}' has no type or shape in the model; re-export with shapes")
        dims = tuple(_dim(d) for d in value.shape)
        specs.append(InputSpec(value.name, np.dtype(value.dtype.numpy()), dims))
    return _with_shapes(specs, shapes) if shapes else specs


def _dim(dim: int | ir.SymbolicDim) -> int | str | None:
    if isinstance(dim, int):
        return dim if dim >= 0 else None
    return str(dim) if dim.value else None


def _with_shapes(specs: list[InputSpec], shapes: Mapping[str, Sequence[int]]) -> list[InputSpec]:
    names = [spec.name for spec in specs]
    given = dict(shapes)
    if "" in given:
        if len(specs) != 1:
            raise UsageError(f"--input-shape needs NAME=... for a model with inputs {', '.join(names)}")
        given[names[0]] = given.pop("")
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise UsageError(f"--input-shape names {unknown[0]!r}, not an input; the inputs are {', '.join(names)}")
    fixed = []
    for spec in specs:
        if spec.name not in given:
            fixed.append(spec)
            continue
        dims = tuple(int(d) for d in given[spec.name])
        clash = len(dims) != len(spec.shape) or any(
            d < 1 or (isinstance(m, int) and m != d) for d, m in zip(dims, spec.shape, strict=False)
        )
        if clash:
            raise UsageError(
                f"--input-shape {spec.name}={','.join(map(str, dims))} does not fit the model's shape "
                f"[{', '.join('?' if d is None else str(d) for d in spec.shape)}]"
            )
        fixed.append(InputSpec(spec.name, spec.dtype, dims))
    return fixed


def random_feeds(specs: Sequence[InputSpec], batch: int, seed: int) -> dict[str, np.ndarray]:
    """Deterministic standard-normal feeds (integer inputs get zeros) for shape-only checks."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        shape = spec.concrete_shape(batch)
        if np.issubdtype(spec.dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return feeds


def session_options(
    threads: int = DEFAULT_THREADS, *, spinning: bool = True, optimize: bool = True, many_outputs: bool = False
) -> ort.SessionOptions:
    """Session options with a fixed thread count.

    Turn ``spinning`` off when two sessions are alive on few cores: the idle
    session's spinning threads otherwise steal the cores from the busy one.
    ``many_outputs`` is for instrumented models (calibration, sensitivity) whose
    intermediate tensors are read out: onnxruntime's memory pattern plans one block
    for them all, and without it the sensitivity model of EfficientNet-Lite0 peaked
    57 MB lower at the same speed.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if many_outputs:
        options.enable_mem_pattern = False
    return options


def make_session(
    model: ir.Model | onnx.ModelProto | bytes | os.PathLike | str,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    options: ort.SessionOptions | None = None,
) -> ort.InferenceSession:
    """An onnxruntime session for an IR model, a proto, serialized bytes or a path.

    An IR model or proto with more than `FILE_SESSION_MIN_BYTES` of weights is
    written to a temporary file with its weights beside it, and onnxruntime
    reads that: no serialized copy of the whole model is made on either side
    (ResNet-18: 0.11 s and +100 MB at the peak, against 0.20 s and +186 MB
    through bytes). The model is not modified.
    """
    if isinstance(model, onnx.ModelProto):
        view = ir.serde.deserialize_model(model)  # shares the proto's tensors
        model = view if cir.weight_bytes(view) > FILE_SESSION_MIN_BYTES else model.SerializeToString()
    if isinstance(model, ir.Model) and cir.weight_bytes(model) > FILE_SESSION_MIN_BYTES:
        try:
            with tempfile.TemporaryDirectory(prefix="compressor-session-", ignore_cleanup_errors=True) as folder:
                path = Path(folder) / "model.onnx"
                ir.save(model, path, external_data="model.onnx.data", alignment=4096)
                return _session(str(path), providers, options)
        except OSError:  # no writable temporary folder (or it is full): go through bytes after all
            pass
    if isinstance(model, ir.Model):
        model = cir.to_bytes(model)
    elif isinstance(model, os.PathLike):
        model = str(model)
    return _session(model, providers, options)


def _session(model: bytes | str, providers: Sequence[str], options: ort.SessionOptions | None) -> ort.InferenceSession:
    try:
        session = ort.InferenceSession(model, sess_options=options or session_options(), providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph classes
        why = _the_models_fault(str(exc), providers)
        if why is not None:
            raise ModelError(why) from exc
        raise
    if tuple(providers) == ("CPUExecutionProvider",):
        # The Python wrapper keeps the model bytes only to rebuild the session on a provider failure
        # or `set_providers`, neither of which a CPU-only session needs; they are as large as the model.
        session._model_bytes = None
    return session


def _the_models_fault(message: str, providers: Sequence[str]) -> str | None:
    """The problem and the fix in one line, for onnxruntime load failures that the model causes."""
    if found := re.search(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)", message):
        version, limit = found.groups()
        return (
            f"the model's IR version {version} is newer than onnxruntime {ort.__version__} reads (at most {limit}); "
            f"upgrade onnxruntime, or save the model with ir_version={limit}"
        )
    if found := re.search(r"Could not find an implementation for (\w+)\(\d+\) node with name '([^']*)'", message):
        op, node = found.groups()
        return (
            f"onnxruntime {ort.__version__} ({', '.join(providers)}) has no {op} kernel for the input types of "
            f"node '{node}'; convert the model to types it runs (float32 for most ops)"
        )
    return None


def run(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run a session, passing only the feeds it declares."""
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})
