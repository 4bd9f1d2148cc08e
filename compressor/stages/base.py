"""The stage interface: one compression technique as `compress` runs it.

A stage turns its config (one frozen dataclass, a table of the recipe) into
passes for the pipeline, may check the lowered model on the backend once the
passes have run (the int8 stage's latency guard), and writes its part of the
report. `compress` knows stages only through this interface.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_ir as ir

from compressor.backends import Backend
from compressor.pipeline import Pass, PassContext
from compressor.quantization.sensitivity import LayerSensitivity
from compressor.report import Report


@dataclass(frozen=True)
class Settled:
    """A stage's model after its backend checks.

    ``lowered`` is the model's lowering when the check already made it (else None);
    ``float_islands`` the nodes the check put back in float (None: it did not run).
    """

    model: ir.Model
    lowered: onnx.ModelProto | None = None
    float_islands: tuple[str, ...] | None = None


class Stage(abc.ABC):
    """One technique of a recipe: its passes, its checks on the backend and its report."""

    kind: ClassVar[str]  # the recipe's name for it: ``kind = "quantize_int8"``
    config_class: ClassVar[type]  # its frozen config dataclass
    target: ClassVar[str]  # what ``--target`` calls the result
    rank: ClassVar[int]  # stages run in increasing rank: prune, low-rank, then quantize

    def __init__(self, config: Any) -> None:
        self.config = config

    @classmethod
    def defaults(cls, backend: Backend) -> Mapping[str, object]:
        """Config fields ``backend`` prefers (its fast paths); a recipe's own values override them."""
        return {}

    @abc.abstractmethod
    def passes(self, backend: Backend) -> list[Pass]:
        """The passes this stage adds to the pipeline, in order (fresh instances for one run)."""

    def settle(
        self,
        model: ir.Model,
        backend: Backend,
        context: PassContext,
        float_islands: tuple[str, ...] | None,
        time_islands: bool,
    ) -> Settled:
        """Check the model on ``backend`` once every pass ran.

        ``float_islands`` pins what an earlier run's check decided (no timing); ``time_islands`` says
        whether the recipe's guard may time anything at all.
        """
        return Settled(model)

    def report(self, report: Report, backend: Backend) -> None:  # noqa: B027 - optional hook
        """Add this stage's records to ``report`` (after lowering)."""

    @property
    def reference_outputs(self) -> Sequence[np.ndarray]:
        """Float model outputs on the first calibration samples, when the stage already computed them."""
        return ()

    @property
    def sensitivity(self) -> list[LayerSensitivity]:
        """Layers ranked by how much the technique hurts them (worst first), when the stage ranked them."""
        return []
