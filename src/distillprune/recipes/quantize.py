"""The ``quantize`` recipe: a model beside its quantized copies (``distillprune.evaluation.quantized``): the
unquantized model at each of ``quantize.dtypes``, one round-to-nearest copy per scheme (saved as a
compressed-tensors folder vLLM serves), and GGUF files for llama.cpp (run by llama.cpp when it is installed)."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from omegaconf import DictConfig

from distillprune.assets import ALIASES
from distillprune.evaluation.suite import evaluate_stage
from distillprune.hardware import run_device
from distillprune.models import load_model, load_tokenizer
from distillprune.recipes.common import build_loggers, prepare_output_dir, write_metrics


def run(cfg: DictConfig) -> dict[str, Any]:
    """The ``quantize`` recipe; writes ``metrics.json`` and ``report.md``, returns the metrics."""
    start = time.perf_counter()
    out = prepare_output_dir(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    device = run_device(str(cfg.device))
    model = load_model(**cfg.model, device=device).eval()
    tok = load_tokenizer(cfg.model.name)
    metrics: dict[str, Any] = {"source": source(str(cfg.model.name))}
    evaluate_stage(cfg, {str(model.dtype).removeprefix("torch."): model}, tok, out, metrics, build_loggers(cfg, out))
    metrics.update(wall_s=round(time.perf_counter() - start, 1), output_dir=str(out))
    write_metrics(metrics, out)
    return metrics


def source(name: str) -> dict[str, Any]:
    """Which model this is: the packaged teacher's weights were de-quantized from Q4_1 (32-wide asymmetric 4-bit
    blocks), so they already sit on a 4-bit grid and INT4 of them flatters INT4."""
    packaged = name in ALIASES
    note = (
        "the packaged teacher, de-quantized from Q4_1: its weights already sit on a 4-bit grid, so INT4 looks "
        "better here than on a trained student"
        if packaged
        else "a model of its own weights (a trained student, or any HF model)"
    )
    return {"model": name, "packaged_teacher": packaged, "note": note}
