"""The ``merge_kv`` recipe: KV-head merging (mean-pooled K/V heads: MHA -> GQA -> MQA), then logit KD from
the unmerged model (the stages are in ``distillprune.recipes.prune``)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from distillprune.recipes.prune import MergeKV, distill_recovery, prune_and_recover


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the recipe; returns the metrics written to ``metrics.json``."""
    return prune_and_recover(cfg, recover=distill_recovery, pruner=MergeKV())
