"""`PruneConfig`: the settings of the recipe's prune stage, the tuner's space among them."""

from __future__ import annotations

from dataclasses import dataclass

from compressor.config import tunable
from compressor.errors import ConfigError

PRUNE_METHODS = ("l1",)
PLANNED_METHODS = ("lrp", "masksparsity")


@dataclass(frozen=True)
class PruneConfig:
    """Structured channel pruning: remove ``fraction`` of the model's MACs, whole channels at a time.

    ``method`` scores the channels (``l1``: filter magnitude). Each group of coupled
    layers keeps at least ``min_keep`` of its channels, in multiples of ``round_to``.
    """

    fraction: float = tunable(0.5, (0.3, 0.5, 0.7))  # of the MACs, removed
    method: str = tunable("l1", PRUNE_METHODS)
    round_to: int = tunable(8, (1, 4, 8, 16))
    min_keep: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction < 1.0:
            raise ConfigError(f"prune fraction must be between 0 and 1 (exclusive), got {self.fraction}")
        if self.method in PLANNED_METHODS:
            raise ConfigError(f"prune method {self.method!r} is not implemented yet; use {', '.join(PRUNE_METHODS)}")
        if self.method not in PRUNE_METHODS:
            raise ConfigError(f"unknown prune method {self.method!r}; choose one of: {', '.join(PRUNE_METHODS)}")
        if self.round_to < 1:
            raise ConfigError(f"prune round_to must be >= 1, got {self.round_to}")
        if not 0.0 < self.min_keep <= 1.0:
            raise ConfigError(f"prune min_keep must be in (0, 1], got {self.min_keep}")
