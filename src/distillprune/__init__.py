"""distillprune: knowledge distillation and structured pruning for Llama-family language models."""

from distillprune.prune import modeling as _modeling  # noqa: F401 - registers per-layer pruned model types

__version__ = "0.1.0"
