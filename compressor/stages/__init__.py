"""Compression techniques as recipe stages: the name -> class table a recipe's ``kind`` is looked up in.

A new technique is a `Stage` subclass in a module of its own and one line here.
"""

from compressor.stages.base import Settled, Stage
from compressor.stages.prune import PruneStage
from compressor.stages.quantize_int8 import QuantizeInt8Stage
from compressor.stages.quantize_int16 import QuantizeInt16Stage

STAGES: dict[str, type[Stage]] = {stage.kind: stage for stage in (PruneStage, QuantizeInt8Stage, QuantizeInt16Stage)}
# Kinds a recipe may name that are still being built: "not implemented yet" rather than "unknown".
PLANNED_STAGES = ("lowrank",)

__all__ = ["PLANNED_STAGES", "STAGES", "PruneStage", "QuantizeInt8Stage", "QuantizeInt16Stage", "Settled", "Stage"]
