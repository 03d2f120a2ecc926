"""Run a recipe: ``python train.py recipe=NAME key=value ...`` (no arguments lists the recipes)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # run from a checkout without installing

from distillprune.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
