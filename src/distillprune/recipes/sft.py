"""The ``sft`` recipe: supervised fine-tuning (CE on the data, no teacher in the loss), the baseline every
distillation recipe is compared with. It is ``logit_distill``'s runner; the recipe sets ``kd_weight: 0``."""

from distillprune.recipes.logit_distill import run

__all__ = ["run"]
