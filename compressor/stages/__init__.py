"""Compression techniques as recipe stages: the name -> class table a recipe's ``kind`` is looked up in.

A new technique is a `Stage` subclass in a module of its own and one line here.
"""

from compressor.stages.base import Settled, Stage
from compressor.stages.quantize_int8 import QuantizeInt8Stage

STAGES: dict[str, type[Stage]] = {stage.kind: stage for stage in (QuantizeInt8Stage,)}
# Kinds a recipe may name that are still being built: "not implemented yet" rather than "unknown".
PLANNED_STAGES = ("quantize_int16", "prune", "lowrank")

__all__ = ["PLANNED_STAGES", "STAGES", "QuantizeInt8Stage", "Settled", "Stage"]
