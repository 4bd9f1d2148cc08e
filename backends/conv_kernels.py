"""Per conv, the faster of MLAS's two int8 convolution paths, chosen by profiling both in place.

onnxruntime runs a QLinearConv whose weight zero point is 0 on MLAS's
symmetric-conv kernels, and any other on its general quantized GEMM (im2col,
then QGEMM, which uses AMX tiles on CPUs that have them). Neither wins
everywhere. Profiled inside ResNet-50 at 224 on an AMX Xeon, batch 1:

- 512->512 3x3 at 7x7: 0.39 ms symmetric, 0.25 ms GEMM;
- 64->256 1x1 at 56x56: 0.17 ms symmetric, 0.37 ms GEMM.

A symmetric weight ``q`` (|q| <= 127) stored as ``q - 1`` with zero point -1
is the same weight, so the choice changes speed and nothing else. Each dense
conv takes the GEMM path only if it is at least `MIN_GAIN` and `MIN_SAVING_US`
faster there, measured in the model itself (both variants profiled, runs
interleaved, per-node medians). Choices are cached by node, so the variants
the latency guard builds reuse them.
"""

from __future__ import annotations

import re
import statistics
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from compressor import runtime

OFFSET_ZERO_NAME = "weight_zero_offset"
MIN_GAIN = 0.05
MIN_SAVING_US = 10.0  # below this per run, profiling noise decides: tiny convs keep the default path
# Convs within a few percent of MIN_GAIN flip between profiles at 12 runs as at 8 (ResNet-18 at 224,
# three profiles each); fewer runs would let noise decide clear cases too.
PROFILE_RUNS = 8
WARMUP_RUNS = 1
Key = tuple[str, tuple[int, ...], str]


class ConvKernelChooser:
    """Moves each dense QLinearConv to the GEMM path where profiling shows it faster.

    With ``pinned`` (the names a recorded run chose), those convs take the GEMM path and
    nothing is profiled, so the lowering repeats that run's exactly.
    """

    __slots__ = ("choices", "pinned", "threads")

    def __init__(self, threads: int = runtime.DEFAULT_THREADS, pinned: Iterable[str] | None = None) -> None:
        self.threads = threads
        self.pinned = frozenset(pinned) if pinned is not None else None
        self.choices: dict[Key, bool] = {}  # conv -> runs on the GEMM path

    def __call__(self, model: onnx.ModelProto, feeds: Mapping[str, np.ndarray] | None) -> onnx.ModelProto:
        """``model`` (fused integer form) with the faster path for each conv; profiles convs not seen before.

        Without ``feeds`` (a symbolic input dimension) nothing can be profiled and only pinned convs move.
        """
        candidates = gemm_path_candidates(model)
        if self.pinned is not None or feeds is None:
            chosen = [node for node in candidates if node in (self.pinned or ())]
            return offset_weights(model, chosen) if chosen else model
        unknown = [node for node in candidates if _key(node, candidates[node]) not in self.choices]
        if unknown:
            self._profile(model, {node: candidates[node] for node in unknown}, feeds)
        chosen = [node for node in candidates if self.choices.get(_key(node, candidates[node]), False)]
        return offset_weights(model, chosen) if chosen else model

    def _profile(
        self, model: onnx.ModelProto, convs: Mapping[str, onnx.TensorProto], feeds: Mapping[str, np.ndarray]
    ) -> None:
        times = _profile_pair(model, offset_weights(model, list(convs)), feeds, self.threads)
        for node, weight in convs.items():
            symmetric, gemm = times[0].get(node), times[1].get(node)
            faster = (
                symmetric is not None
                and gemm is not None
                and gemm < (1 - MIN_GAIN) * symmetric
                and symmetric - gemm >= MIN_SAVING_US
            )
            self.choices[_key(node, weight)] = faster


def _key(node: str, weight: onnx.TensorProto) -> Key:
    return node, tuple(weight.dims), weight.name


def gemm_path_candidates(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Named dense QLinearConvs with their own symmetric int8 weight (zero point 0, no -128), by name."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    uses: dict[str, int] = defaultdict(int)
    for node in model.graph.node:
        for name in node.input:
            uses[name] += 1
    found = {}
    for node in model.graph.node:
        if node.op_type != "QLinearConv" or not node.name:
            continue
        if any(a.name == "group" and a.i != 1 for a in node.attribute):
            continue  # depthwise and grouped convs are faster on the symmetric kernels everywhere we measured
        weight, zero = initializers.get(node.input[3]), initializers.get(node.input[5])
        if weight is None or zero is None or uses[weight.name] != 1 or weight.data_type != onnx.TensorProto.INT8:
            continue
        if np.any(numpy_helper.to_array(zero) != 0) or numpy_helper.to_array(weight).min() == -128:
            continue
        found[node.name] = weight
    return found


def offset_weights(model: onnx.ModelProto, convs: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose named QLinearConvs store their weights as ``q - 1`` with zero point -1."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    initializers = {tensor.name: tensor for tensor in result.graph.initializer}
    if OFFSET_ZERO_NAME not in initializers:
        result.graph.initializer.append(numpy_helper.from_array(np.array(-1, np.int8), OFFSET_ZERO_NAME))
    wanted = set(convs)
    for node in result.graph.node:
        if node.op_type == "QLinearConv" and node.name in wanted:
            weight = initializers[node.input[3]]
            shifted = numpy_helper.to_array(weight).astype(np.int16) - 1
            weight.CopyFrom(numpy_helper.from_array(shifted.astype(np.int8), weight.name))
            node.input[5] = OFFSET_ZERO_NAME
    return result


def _profile_pair(
    first: onnx.ModelProto, second: onnx.ModelProto, feeds: Mapping[str, np.ndarray], threads: int
) -> list[dict[str, float]]:
    """Median kernel time of every node (by original name) in each model, runs interleaved."""
    with tempfile.TemporaryDirectory(prefix="compressor-profile-") as folder:
        sessions = []
        for index, model in enumerate((first, second)):
            options = runtime.session_options(threads, spinning=False)
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(folder) / f"model{index}")
            sessions.append(runtime.make_session(model, ("CPUExecutionProvider",), options))
        for _ in range(WARMUP_RUNS + PROFILE_RUNS):
            for session in sessions:
                runtime.run(session, feeds)
        return [_node_medians(Path(session.end_profiling())) for session in sessions]


NODE_EVENT = re.compile(r'"cat"\s*:\s*"Node".*?"dur"\s*:\s*(\d+).*?"name"\s*:\s*"([^"]+)_kernel_time"')


def _node_medians(profile: Path) -> dict[str, float]:
    # onnxruntime writes one event per line; only each node's duration is read, so the whole
    # profile (tens of MB on large models) is never held as Python objects.
    # Its layout pass may add "_token_<n>" to a node's name.
    samples: dict[str, list[float]] = defaultdict(list)
    with profile.open() as lines:
        for line in lines:
            event = NODE_EVENT.search(line)
            if event:
                samples[re.sub(r"_token_\d+$", "", event.group(2))].append(float(event.group(1)))
    return {node: statistics.median(times[WARMUP_RUNS:] or times) for node, times in samples.items()}
