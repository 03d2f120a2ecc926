"""The ``prune_lora`` recipe: structured pruning, then LoRA adapters (peft) trained on the pruned model and merged into
the exported plain model (the stages are in ``distillprune.recipes.prune``)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from distillprune.recipes.prune import lora_recovery, prune_and_recover


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the recipe; returns the metrics written to ``metrics.json``."""
    return prune_and_recover(cfg, recover=lora_recovery)
