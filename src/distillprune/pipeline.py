"""What a recipe's top-level ``_target_`` runs: build the models, data and system, train, evaluate, export."""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from distillprune.checkpoint import AtomicCheckpointIO, resolve_resume
from distillprune.config import instantiate
from distillprune.evaluate import perplexity
from distillprune.models import export, load_model, load_student, load_tokenizer, shared_vocab_size

log = logging.getLogger(__name__)


def distill(cfg: DictConfig) -> dict[str, Any]:
    """Logit distillation (or, with ``system.kd_weight=0``, CE-only training) from a recipe; returns the metrics."""
    start = time.perf_counter()
    out = prepare_output_dir(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    tokenizer = load_tokenizer(cfg.student.name)
    data = instantiate(cfg.data, tokenizer=tokenizer, seed=cfg.seed)
    data.setup("fit")
    student = load_student(**cfg.student)
    metrics: dict[str, Any] = {"params": {"student": _count(student)}}

    kd_weight = float(cfg.system.get("kd_weight", 0.0))
    teacher, loss = None, None
    if cfg.teacher is not None:
        teacher = load_model(**cfg.teacher)
        vocab = shared_vocab_size(teacher, student, load_tokenizer(cfg.teacher.name), tokenizer)
        metrics["params"]["teacher"] = _count(teacher)
        metrics["teacher"] = perplexity(teacher, data.val_dataloader())
        loss = instantiate(cfg.loss, vocab_size=vocab) if kd_weight > 0 else None
        if kd_weight == 0:
            teacher = None  # evaluated for the report only; CE training never needs it in memory
    metrics["student_init"] = perplexity(student, data.val_dataloader())
    log.info("before training: %s", metrics)

    system = instantiate(cfg.system, student=student, teacher=teacher, loss=loss)
    trainer = build_trainer(cfg, out)
    fit_start = time.perf_counter()
    trainer.fit(system, datamodule=data, ckpt_path=resolve_resume(cfg.resume, out / "checkpoints"))
    fit_s = time.perf_counter() - fit_start

    metrics["student"] = perplexity(student, data.val_dataloader())
    export(student, tokenizer, out / "final")
    steps = int(trainer.global_step)
    tokens = steps * cfg.data.batch_size * cfg.data.seq_len * trainer.accumulate_grad_batches
    metrics.update(
        steps=steps,
        tokens_per_s=round(tokens / fit_s, 1) if steps else 0.0,
        wall_s=round(time.perf_counter() - start, 1),
        output_dir=str(out),
    )
    write_metrics(metrics, out)
    return metrics


def _count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def prepare_output_dir(cfg: DictConfig) -> Path:
    """Create the run folder (default ``runs/<recipe>-<timestamp>``) and save the resolved config in it."""
    if cfg.output_dir is None:
        cfg.output_dir = f"runs/{cfg.recipe}-{datetime.now():%Y%m%d-%H%M%S}"
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "config.yaml.tmp"
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    os.replace(tmp, out / "config.yaml")
    return out


def build_trainer(cfg: DictConfig, out: Path) -> L.Trainer:
    """The Lightning trainer of ``cfg.trainer`` with atomic checkpoints, CSV (+ W&B) logs and a progress bar."""
    ckpt = ModelCheckpoint(
        dirpath=out / "checkpoints",
        filename="step{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=cfg.checkpoint.every_n_steps,
        save_top_k=cfg.checkpoint.keep,
        monitor="step",
        mode="max",
        save_last="link",
    )
    callbacks: list = [ckpt]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(RichProgressBar())
    return instantiate(
        cfg.trainer,
        default_root_dir=str(out),
        callbacks=callbacks,
        logger=build_loggers(cfg, out),
        plugins=[AtomicCheckpointIO()],
    )


def build_loggers(cfg: DictConfig, out: Path) -> list[Logger]:
    """A CSV log always; W&B online when an API key is set, offline otherwise, or disabled."""
    loggers: list[Logger] = [CSVLogger(str(out), name="logs", version="")]
    wb = cfg.logger.wandb
    mode = wb.mode
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    if mode != "disabled":
        os.environ.setdefault("WANDB_INIT_TIMEOUT", "60")
        loggers.append(
            WandbLogger(
                project=wb.project,
                entity=wb.entity,
                name=wb.name or out.name,
                save_dir=str(out),
                mode=mode,
                config=OmegaConf.to_container(cfg, resolve=True),
            )
        )
    return loggers


def write_metrics(metrics: dict[str, Any], out: Path) -> None:
    """Write ``metrics.json`` atomically and print the perplexities as a small table."""
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, out / "metrics.json")
    table = Table(title=f"{out.name}: validation perplexity")
    for col in ("model", "val loss", "val PPL"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for name in ("teacher", "student_init", "student"):
        if name in metrics:
            table.add_row(name, f"{metrics[name]['val_loss']:.4f}", f"{metrics[name]['val_ppl']:.2f}")
    console = Console()
    console.print(table)
    console.print(
        f"steps {metrics['steps']}, {metrics['tokens_per_s']} tokens/s, wall {metrics['wall_s']} s; "
        f"student exported to {out / 'final'}"
    )
