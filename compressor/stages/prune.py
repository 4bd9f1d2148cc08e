"""The prune stage: structured channel pruning to a MACs target (`PruneChannels`), before any quantization."""

from __future__ import annotations

from compressor.backends import Backend
from compressor.passes.prune_channels import PruneChannels
from compressor.pipeline import Pass
from compressor.pruning.config import PruneConfig
from compressor.report import Report
from compressor.stages.base import Stage


class PruneStage(Stage):
    """Remove whole channels (smaller dense layers), scored by ``method``, until ``fraction`` of the MACs is gone."""

    kind = "prune"
    config_class = PruneConfig
    target = "fp32"
    rank = 10

    def __init__(self, config: PruneConfig) -> None:
        super().__init__(config)
        self.prune = PruneChannels(config)

    def passes(self, backend: Backend) -> list[Pass]:
        return [self.prune]

    def report(self, report: Report, backend: Backend) -> None:
        choice = self.prune.choice
        if choice is None:
            return
        record = next(r for r in report.passes if r["name"] == self.prune.name)
        record["macs_before"], record["macs_after"] = choice.macs_before, choice.macs_after
        record["macs_removed"] = round(choice.fraction_removed, 4)
        record["layers"] = self.prune.layers
        record["blocked"] = self.prune.blocked
        record["compensated"] = self.prune.compensated
        record["fine_tuning"] = [epoch.as_dict() for epoch in self.prune.training]
        if self.prune.sparsity:
            record["masksparsity"] = self.prune.sparsity
        removed = f"pruning ({self.config.method}) removed {choice.fraction_removed:.1%} of the MACs"
        if self.prune.training:
            best = max(self.prune.training, key=lambda e: e.holdout_top1)
            report.notes.append(
                f"{removed}, then fine-tuned {len(self.prune.training)} epoch(s): held-out top-1 "
                f"{best.holdout_top1:.2%} at epoch {best.epoch}"
            )
        else:
            report.notes.append(
                f"{removed} with no fine-tuning: accuracy may drop; pass --train DATA.npz (with labels 'y') to "
                "fine-tune"
            )
