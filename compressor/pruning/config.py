"""`PruneConfig`: the settings of the recipe's prune stage, the tuner's space among them."""

from __future__ import annotations

from dataclasses import dataclass

from compressor.config import tunable
from compressor.errors import ConfigError

PRUNE_METHODS = ("l1", "lrp", "masksparsity")
PLANNED_METHODS: tuple[str, ...] = ()


@dataclass(frozen=True)
class PruneConfig:
    """Structured channel pruning: remove ``fraction`` of the model's MACs, whole channels at a time.

    ``method`` scores the channels: ``l1`` (filter magnitude, no data), ``lrp`` (relevance
    of each channel to the true class, or the predicted one, on ``lrp_samples`` of the
    training or calibration data) or ``masksparsity`` (a sparse-training mask, then
    training with the penalty on the masked channels only, ``sparse_epochs``; needs
    ``--train``). ``steps`` > 1 removes the fraction in that many rounds, scoring again
    in between (not MaskSparsity). Each group of coupled
    layers keeps at least ``min_keep`` of its channels, in multiples of ``round_to``.
    With data (calibration or training), ``compensate`` moves each removed channel's
    mean into the next layer's bias. With training data (``--train``), the pruned
    model is fine-tuned for ``epochs`` (`compressor.training`), distilled from the
    original with weight ``distill``.
    """

    fraction: float = tunable(0.5, (0.3, 0.5, 0.7))  # of the MACs, removed
    method: str = tunable("l1", PRUNE_METHODS)
    round_to: int = tunable(8, (1, 4, 8, 16))
    min_keep: float = 0.1
    steps: int = tunable(1, (1, 2, 4))
    lrp_samples: int = tunable(256, (100, 256, 1024))
    sparse_epochs: int = tunable(2, (1, 2, 4))
    compensate: bool = tunable(True, (False, True))
    epochs: int = tunable(3, (1, 3, 5))
    lr: float = tunable(1e-3, (3e-4, 1e-3, 3e-3))
    batch_size: int = 64
    distill: float = tunable(1.0, (0.0, 1.0))
    train_samples: int | None = None  # read at most this many training samples (None: all)

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction < 1.0:
            raise ConfigError(f"prune fraction must be between 0 and 1 (exclusive), got {self.fraction}")
        if self.method in PLANNED_METHODS:
            raise ConfigError(f"prune method {self.method!r} is not implemented yet; use {', '.join(PRUNE_METHODS)}")
        if self.method not in PRUNE_METHODS:
            raise ConfigError(f"unknown prune method {self.method!r}; choose one of: {', '.join(PRUNE_METHODS)}")
        if self.round_to < 1:
            raise ConfigError(f"prune round_to must be >= 1, got {self.round_to}")
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("prune epochs must be >= 0, batch_size >= 1 and lr > 0")
        if self.steps < 1 or self.lrp_samples < 1 or self.sparse_epochs < 1:
            raise ConfigError("prune steps, lrp_samples and sparse_epochs must be >= 1")
        if self.train_samples is not None and self.train_samples < 1:
            raise ConfigError(f"prune train_samples must be >= 1, got {self.train_samples}")
        if not 0.0 < self.min_keep <= 1.0:
            raise ConfigError(f"prune min_keep must be in (0, 1], got {self.min_keep}")
