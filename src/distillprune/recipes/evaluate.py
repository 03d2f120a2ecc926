"""The ``evaluate`` recipe: saved models (``model``, and ``baseline`` when set) measured side by side, as every
training recipe's last stage measures its own (``distillprune.evaluation.suite``)."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from omegaconf import DictConfig

from distillprune.evaluation.suite import evaluate_stage
from distillprune.hardware import run_device
from distillprune.models import load_model, load_tokenizer
from distillprune.recipes.common import build_loggers, prepare_output_dir, write_metrics


def run(cfg: DictConfig) -> dict[str, Any]:
    """The ``evaluate`` recipe: ``model`` (and ``baseline`` when set, loaded the same way) side by side; writes
    ``metrics.json`` and ``report.md``."""
    start = time.perf_counter()
    out = prepare_output_dir(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    device = run_device(str(cfg.device))
    models = {}
    if cfg.baseline:
        models[f"baseline: {cfg.baseline}"] = load_model(**{**cfg.model, "name": cfg.baseline}, device=device)
    models[f"model: {cfg.model.name}"] = load_model(**cfg.model, device=device)
    tok = load_tokenizer(cfg.model.name)
    metrics: dict[str, Any] = {}
    evaluate_stage(cfg, models, tok, out, metrics, build_loggers(cfg, out))
    metrics.update(wall_s=round(time.perf_counter() - start, 1), output_dir=str(out))
    write_metrics(metrics, out)
    return metrics
