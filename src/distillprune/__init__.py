"""distillprune: knowledge distillation and structured pruning for Llama-family language models."""

__version__ = "0.1.0"
