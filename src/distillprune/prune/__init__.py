"""LLM-Pruner-style structured pruning: declarative groups, importance, selection, surgery, HF export."""

from distillprune.prune import modeling  # noqa: F401 - registers the per-layer config/model types
from distillprune.prune.groups import Widths, layer_widths
from distillprune.prune.importance import score
from distillprune.prune.surgery import apply, plan, select

__all__ = ["Widths", "apply", "layer_widths", "plan", "score", "select"]
