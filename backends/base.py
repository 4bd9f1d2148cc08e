"""The backend interface: lower an IR model and run it on onnxruntime.

A backend owns the execution providers and the lowering (what the model must
look like to run fastest there). Passes never import backends; the pipeline
context only names one.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from compressor import ir as cir
from compressor import metrics, runtime
from compressor.backends.compact import compact

QUICK_RUNS = 5  # a first timing that sizes the real one


class Backend(abc.ABC):
    """One onnxruntime target: its providers and its lowering."""

    name: str = "backend"
    providers: tuple[str, ...] = ()

    def __init__(self, threads: int = runtime.DEFAULT_THREADS, qdq: bool = False) -> None:
        self.threads = threads
        self.qdq = qdq
        self.rejected: dict[str, str] = {}  # node -> why the lowering left it in QDQ/float form
        self.rewrites: dict[str, list[str]] = {}  # speed-only rewrite -> nodes, from the last lowering
        self.check_available()

    @property
    def int8_preferences(self) -> Mapping[str, object]:
        """Quantization settings that keep this backend on its fast kernels (QuantizeInt8Config fields)."""
        return {}

    @property
    def times_int8_islands(self) -> bool:
        """Whether `compress` should time each int8 island here and keep float where that is faster."""
        return False

    @property
    def dequantizes_weights_at_load(self) -> bool:
        """Whether the lowering turns int8 weights of float nodes into float constants built at load.

        Where it does, nodes kept in float for speed can still store int8 weights (`StoreWeightsInt8`);
        elsewhere their DequantizeLinear would run on every call.
        """
        return False

    def timed_choices(self) -> Mapping[str, object]:
        """What the last lowering chose by timing, as `compressor.recipe.BackendSettings` fields to pin it."""
        return {}

    def check_available(self) -> None:  # noqa: B027 - optional hook, most backends always run
        """Raise `BackendUnavailableError` if this backend cannot run here."""

    @abc.abstractmethod
    def lower(self, model: ir.Model) -> onnx.ModelProto:
        """The ONNX model this backend should execute for ``model``."""

    def executable(self, model: ir.Model) -> ir.Model | onnx.ModelProto:
        """What a session runs for ``model``: its lowering, unless lowering would change nothing that runs.

        Backends override this to hand such a model over as it is, with no serialized copy beside the session.
        """
        return self.lower(model)

    def session(
        self, model: ir.Model | onnx.ModelProto | str | os.PathLike, *, spinning: bool = True
    ) -> ort.InferenceSession:
        """An inference session with this backend's providers and thread count (a path: a model file as it is)."""
        runnable = self.executable(model) if isinstance(model, ir.Model) else model
        options = runtime.session_options(self.threads, spinning=spinning)
        return runtime.make_session(runnable, self.providers, options)

    def run(self, session: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run ``session`` on ``feeds`` (extra feeds are ignored)."""
        return runtime.run(session, feeds)

    def latency(
        self,
        models: Sequence[ir.Model | onnx.ModelProto | str | os.PathLike],
        feeds: Mapping[str, np.ndarray],
        runs: int | None = None,
        seconds: float = 1.0,
        max_runs: int = 500,
    ) -> list[metrics.Latency]:
        """Median latency of each model, measured interleaved with spinning off.

        Without ``runs``, a short first timing sets the count so the whole
        measurement takes about ``seconds`` (20 to ``max_runs`` runs): tiny models
        get enough runs for a stable median, large ones do not take minutes.
        """
        sessions = [self.session(m, spinning=False) for m in models]
        return self.time_sessions(sessions, feeds, runs, seconds, max_runs)

    def time_sessions(
        self,
        sessions: Sequence[ort.InferenceSession],
        feeds: Mapping[str, np.ndarray],
        runs: int | None = None,
        seconds: float = 1.0,
        max_runs: int = 500,
        warmup: int = 3,
    ) -> list[metrics.Latency]:
        """`latency` for sessions already built here with spinning off (a caller timing one model in many rounds).

        Each timing starts with ``warmup`` untimed runs of every session.
        """
        if runs is None:
            estimate = metrics.interleaved_latency(sessions, feeds, runs=QUICK_RUNS, warmup=warmup)
            runs = int(np.clip(seconds * 1e3 / sum(t.median_ms for t in estimate), 20, max_runs))
        return metrics.interleaved_latency(sessions, feeds, runs=runs, warmup=warmup)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(threads={self.threads})"


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialisation in deployment form (see `compact`): the lowering of fp32 and QDQ models."""
    return compact(cir.to_proto(model))
