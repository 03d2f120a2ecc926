"""The ``prune_depth`` recipe: depth pruning (whole decoder layers by block importance), then logit KD from the
unpruned model (the stages are in ``distillprune.recipes.prune``)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from distillprune.recipes.prune import Depth, distill_recovery, prune_and_recover


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the recipe; returns the metrics written to ``metrics.json``."""
    return prune_and_recover(cfg, recover=distill_recovery, pruner=Depth())
