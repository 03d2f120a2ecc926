"""The skeleton every runner shares: the run folder, the loss, the trainer and its loggers, training with
resume and requeue, the teacher for the evaluation stage, and ``metrics.json`` with its tables."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from transformers import PreTrainedModel

from distillprune.checkpoint import (
    AtomicCheckpointIO,
    RequeueOnSignal,
    ResumedCSVLogger,
    requeue_job,
    resolve_resume,
    slurm_plugins,
)  # fmt: skip
from distillprune.config import default_output_dir, instantiate
from distillprune.errors import UserError
from distillprune.evaluation.report import comparison_rows
from distillprune.hardware import decisions, library_versions, resolve_precision
from distillprune.losses import Divergence
from distillprune.models import load_model
from distillprune.quant.model import end_fake_quantized, train_fake_quantized
from distillprune.quant.settings import check_aware
from distillprune.strategies import build_strategy, resolve_loss_impl, trained_student

log = logging.getLogger(__name__)


def evaluation_teacher(
    cfg: DictConfig, teacher: PreTrainedModel | None, world_size: int, student: PreTrainedModel
) -> PreTrainedModel:
    """The teacher for the evaluation stage: the one in memory after a single-process run; loaded again when
    training did not keep it (CE-only) or sharded it across ranks (ZeRO-3 / FSDP)."""
    device = next(student.parameters()).device
    if teacher is None or world_size > 1:
        teacher = load_model(**cfg.teacher, device=device, role="teacher")
    return teacher.to(device)


def kd_loss(cfg: DictConfig) -> Divergence | None:
    """The recipe's KD loss when the system uses one (kd_weight > 0 or on-policy lmbda > 0), else None."""
    uses_teacher = float(cfg.system.get("kd_weight", 0.0)) > 0 or float(cfg.system.get("lmbda", 0.0)) > 0
    if uses_teacher and cfg.teacher is None:
        raise UserError("system.kd_weight > 0 needs a teacher; set teacher.name or system.kd_weight=0")
    if not uses_teacher:
        return None
    return divergence(cfg)


def divergence(cfg: DictConfig) -> Divergence:
    """The recipe's ``loss`` divergence; an explicit ``system.loss_impl`` that the strategy cannot run is a
    one-line error here, before any loading."""
    impl = str(cfg.system.get("loss_impl", "auto"))
    if impl != "auto":
        resolve_loss_impl(str(cfg.trainer.get("strategy", "auto")), impl)
    return instantiate(cfg.loss)


def loss_impl(cfg: DictConfig, loss: Divergence | None) -> str:
    """How the system computes CE + KD: ``system.loss_impl`` with ``auto`` resolved for the strategy; CE-only
    training (no divergence) computes the plain dense CE."""
    if loss is None:
        return "dense"
    return resolve_loss_impl(str(cfg.trainer.get("strategy", "auto")), str(cfg.system.get("loss_impl", "auto")))


def train(
    cfg: DictConfig,
    student: PreTrainedModel,
    teacher: PreTrainedModel | None,
    loss: Divergence | None,
    data: L.LightningDataModule,
    out: Path,
    system_overrides: dict[str, Any] | None = None,
    callbacks: list[L.Callback] | None = None,
) -> tuple[L.Trainer, L.LightningModule, float, PreTrainedModel | None]:
    """Fit ``cfg.system`` around the models on ``data``, checkpointing under ``out``; resumes per ``cfg.resume``.

    Returns the trainer, the system, the seconds of fit and the trained student as one plain model: on global rank
    0 only (gathered from the shards under ZeRO-3 / FSDP); None on the other ranks, whose work ends here."""
    overrides = {"loss_impl": loss_impl(cfg, loss), **(system_overrides or {})}
    aware = check_aware(cfg.quantize, cfg) if cfg.get("quantize") is not None else None
    if aware is not None:  # quantization-aware: the student trains on the grid its quantized copy will have
        n = train_fake_quantized(student, aware, tuple(cfg.quantize.ignore))
        log.info("quantization-aware training: %d linear layers fake-quantized to %s", n, aware.name)
    system = instantiate(cfg.system, student=student, teacher=teacher, loss=loss, seed=cfg.seed, **overrides)
    ckpt_path = resolve_resume(cfg.resume, out / "checkpoints")  # once per training run (validation checked it)
    trainer = build_trainer(cfg, out, callbacks, resumed=ckpt_path is not None)
    fit_start = time.perf_counter()
    try:
        trainer.fit(system, datamodule=data, ckpt_path=ckpt_path)
    except RuntimeError as err:
        if ckpt_path is None or "state_dict" not in str(err):
            raise
        first = str(err).strip().splitlines()[0]
        raise UserError(f"resume={ckpt_path}: the checkpoint does not fit this run's student ({first})") from None
    fit_s = time.perf_counter() - fit_start
    requeued = any(isinstance(c, RequeueOnSignal) and c.requeued for c in trainer.callbacks)
    late = any(isinstance(c, RequeueOnSignal) and c.signalled and not c.requeued for c in trainer.callbacks)
    if late:  # signalled after the last step (in the final validation): every task got it; requeue now
        if trainer.is_global_zero:
            requeue_job()
        requeued = True
    # a collective: every rank takes part (or none, when the job was checkpointed for its requeued attempt)
    student = None if requeued else trained_student(trainer, system.student)
    if aware is not None:  # the float weights the grid was computed from; quantize rounds them as trained
        end_fake_quantized(system.student)
        if student is not None:
            end_fake_quantized(student)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # the other ranks are done; one left open can abort at exit
    if requeued:
        log.info("checkpointed for the requeued job; this attempt ends here")
        raise SystemExit(0)
    return trainer, system, fit_s, student


def prepare_output_dir(cfg: DictConfig) -> Path:
    """Create the run folder (default ``runs/<recipe>-<timestamp>``, or ``-<job id>`` under SLURM) and save the
    resolved config in it. Every recipe starts here, so the trainer's scale settings are checked here first."""
    if "trainer" in cfg:
        _trainer_strategy(cfg)
    if cfg.output_dir is None:
        cfg.output_dir = default_output_dir(cfg.recipe)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:
        tmp = out / "config.yaml.tmp"
        tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
        os.replace(tmp, out / "config.yaml")
    return out


def build_trainer(
    cfg: DictConfig, out: Path, extra_callbacks: list[L.Callback] | None = None, resumed: bool = False
) -> L.Trainer:
    """The Lightning trainer of ``cfg.trainer`` with atomic checkpoints, CSV (+ W&B) logs (appended to when
    ``resumed``), a progress bar and the run's ``extra_callbacks``."""
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
    slurm_env, slurm_callbacks = slurm_plugins()
    callbacks: list = [ckpt, *slurm_callbacks, *(extra_callbacks or [])]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(RichProgressBar())
    return instantiate(
        cfg.trainer,
        strategy=_trainer_strategy(cfg),
        precision=resolve_precision(str(cfg.trainer.precision), str(cfg.trainer.get("accelerator", "auto"))),
        use_distributed_sampler=False,  # the datamodule shards its own resumable order (ResumableSampler)
        default_root_dir=str(out),
        callbacks=callbacks,
        logger=build_loggers(cfg, out, resumed),
        plugins=[AtomicCheckpointIO(), *slurm_env],
    )


def _trainer_strategy(cfg: DictConfig) -> Any:
    t = cfg.trainer
    return build_strategy(str(t.get("strategy", "auto")), str(t.get("accelerator", "auto")), t.get("devices", 1))


def build_loggers(cfg: DictConfig, out: Path, resumed: bool = False) -> list[Logger]:
    """A CSV log always; W&B online when an API key is set, offline otherwise (or when online fails), or off."""
    csv_logger = ResumedCSVLogger if resumed else CSVLogger
    loggers: list[Logger] = [csv_logger(str(out), name="logs", version="")]
    mode = cfg.logger.wandb.mode
    if mode == "auto":  # the environment's WANDB_MODE wins, as W&B's own tools read it
        env = {"dryrun": "offline", "run": "online"}.get(os.environ.get("WANDB_MODE", ""), os.environ.get("WANDB_MODE"))
        mode = env if env in ("online", "offline", "disabled") else None
        mode = mode or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    if mode == "disabled":
        return loggers
    os.environ.setdefault("WANDB_INIT_TIMEOUT", "60")  # an unreachable server costs a minute, never a hang
    try:
        wandb = _wandb_logger(cfg, out, mode)
        _ = wandb.experiment  # start the run now, so a failure to reach W&B is handled here
    except Exception as err:  # noqa: BLE001 - wandb raises many kinds; all mean "no online run"
        if mode != "online":
            raise
        log.warning("W&B online start failed (%s); logging offline to %s", str(err).splitlines()[0], out / "wandb")
        wandb = _wandb_logger(cfg, out, "offline")
    loggers.append(wandb)
    return loggers


def _wandb_logger(cfg: DictConfig, out: Path, mode: str) -> WandbLogger:
    wb = cfg.logger.wandb
    job = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID"))
    if job and "SLURM_ARRAY_TASK_ID" in os.environ:
        job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    # under SLURM one W&B run per job: named after the recipe and job id, which a requeued attempt continues
    run_id = f"{cfg.recipe}-{job}" if job else None
    return WandbLogger(
        project=wb.project,
        entity=wb.entity,
        name=wb.name or run_id or out.name,
        id=run_id,
        resume="allow" if run_id else None,
        save_dir=str(out),
        mode=mode,
        config=OmegaConf.to_container(cfg, resolve=True),
    )


# the tables a run prints: (title, column -> field of a row); rows are {model: {field: value}}
_TABLES = {
    "perplexity": ("validation perplexity", {"val loss": "val_loss", "val PPL": "val_ppl"}),
    "teacher_agreement": ("agreement with the teacher (held-out prompts, greedy)",
                          {"ROUGE-L": "rouge_l", "token match": "token_match"}),
    "accuracy": ("held-out accuracy", {"accuracy": "accuracy"}),
    "pruning": ("pruning", {"params": "params", "val PPL": "val_ppl", "tokens/s": "tokens_per_s"}),
}  # fmt: skip


def write_metrics(metrics: dict[str, Any], out: Path) -> None:
    """Write ``metrics.json`` atomically and print what it holds as small tables."""
    if rank_zero_only.rank != 0:  # one writer: ranks that reach the end of a stage together (generate-only)
        return
    metrics["auto"] = decisions()  # what each auto setting chose on this machine, and why
    metrics["versions"] = library_versions()
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, out / "metrics.json")
    sections = {
        "perplexity": {k: v for k, v in metrics.items() if isinstance(v, dict) and "val_ppl" in v},
        "teacher_agreement": metrics.get("teacher_agreement", {}),
        "accuracy": {k: {"accuracy": v} for k, v in metrics.get("accuracy", {}).items()},
        "pruning": {
            stage: {field: metrics.get(field, {}).get(stage) for field in ("params", "val_ppl", "tokens_per_s")}
            for stage in ("dense", "pruned", "recovered")
        }
        if isinstance(metrics.get("val_ppl"), dict)
        else {},
    }
    console = Console()
    for key, rows in sections.items():
        if not rows:
            continue
        title, columns = _TABLES[key]
        table = Table(title=f"{out.name}: {title}")
        table.add_column("model")
        for col in columns:
            table.add_column(col, justify="right")
        for name, row in rows.items():
            table.add_row(name, *(_cell(row.get(field)) for field in columns.values()))
        console.print(table)
    if "evaluation" in metrics:
        header, rows = comparison_rows(metrics["evaluation"])
        table = Table(title=f"{out.name}: evaluation (report.md)")
        for col in header:
            table.add_column(col, justify="left" if col == "model" else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    summary = ", ".join(
        f"{k} {metrics[k]}" for k in ("steps", "tokens_per_s", "wall_s") if isinstance(metrics.get(k), (int, float))
    )
    console.print(f"{summary}; written to {out}")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
