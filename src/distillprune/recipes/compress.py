"""The ``compress`` recipe: prune -> KD recovery from the unpruned model -> quantize, in one run. It is
``prune_distill``'s runner; the recipe lists the quantized copies (``quantize``) that the last stage measures."""

from distillprune.recipes.prune_distill import run

__all__ = ["run"]
