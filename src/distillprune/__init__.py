"""distillprune: knowledge distillation and structured pruning for Llama-family language models."""

import os as _os

# importing the package registers the per-layer pruned model types with transformers' Auto classes (torch and
# transformers load with them: seconds). train.py defers that until its recipe has been validated, so that bad
# input fails in a fraction of a second; the command line then imports the same module itself.
if not _os.environ.get("DISTILLPRUNE_DEFER_REGISTRATION"):
    from distillprune.prune import modeling as _modeling  # noqa: F401

__version__ = "0.1.0"
