"""The ``prune_magnitude`` recipe: unstructured magnitude pruning to ``prune.sparsity``, KD recovery from the
dense model with the masks fixed; the (absent) speed-up is measured, not assumed (the stages are in
``distillprune.recipes.prune``)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from distillprune.recipes.prune import magnitude_and_recover


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the recipe; returns the metrics written to ``metrics.json``."""
    return magnitude_and_recover(cfg)
