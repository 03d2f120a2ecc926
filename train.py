"""Run a recipe: ``python train.py recipe=NAME key=value ...`` (no arguments lists the recipes)."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # run from a checkout without installing

os.environ["DISTILLPRUNE_DEFER_REGISTRATION"] = "1"  # validate first, then import torch (distillprune.cli)
from distillprune.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
