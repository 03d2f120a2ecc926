"""The ``logit_distill`` recipe (and ``sft``, the same runner with ``kd_weight: 0``): build the student, the
teacher and the data, measure both before training, train, evaluate side by side, export. With
``teacher_store.k`` set, the teacher's top-k targets come from the offline store (its ``teacher_logits`` stage
builds what is missing) and training keeps no teacher in memory."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from distillprune import sharded
from distillprune.config import instantiate
from distillprune.evaluation.metrics import count_params, perplexity
from distillprune.evaluation.suite import evaluate_stage
from distillprune.hardware import run_device
from distillprune.models import export, load_tokenizer, shared_vocab_size
from distillprune.recipes.common import evaluation_teacher, kd_loss, prepare_output_dir, train, write_metrics
from distillprune.recipes.offline_teacher import offline_teacher

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Logit distillation (or, with ``system.kd_weight=0``, CE-only training) from a recipe; returns the metrics."""
    start = time.perf_counter()
    out = prepare_output_dir(cfg)
    loss = kd_loss(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    device = run_device(str(cfg.trainer.accelerator))
    tokenizer = load_tokenizer(cfg.student.name)
    data = instantiate(cfg.data, tokenizer=tokenizer, seed=cfg.seed)
    data.setup("fit")
    how = sharded.loading(cfg)  # under ZeRO-3 / FSDP on several ranks no rank loads a whole model
    student = sharded.load_trained_student(cfg.student, how, cfg, device)
    metrics: dict[str, Any] = {"params": {"student": count_params(student)}}
    metrics["resident_params"] = {"student": sharded.resident_numel(student)}  # on this rank, once loaded
    before = sharded.BeforeTraining() if how != "whole" else None  # measured in the strategy, by every rank
    lead = rank_zero_only.rank == 0  # other ranks (started by the launcher or srun) only train
    teacher, vocab, stored = None, None, False
    spec = cfg.get("teacher_store")
    if loss is not None and spec is not None and spec.k is not None:  # the offline teacher: built, then read
        _, vocab, metrics["teacher_store"] = offline_teacher(cfg, data, tokenizer, student, device)
        stored = True
        if "train" not in cfg.stages:
            metrics.update(wall_s=round(time.perf_counter() - start, 1), output_dir=str(out))
            write_metrics(metrics, out)
            return metrics
    if cfg.teacher is not None and not stored and (loss is not None or (lead and before is None)):
        teacher = sharded.load_teacher(cfg.teacher, how, cfg, device)
        metrics["params"]["teacher"] = count_params(teacher)
        metrics["resident_params"]["teacher"] = sharded.resident_numel(teacher)
        if loss is not None:
            vocab = shared_vocab_size(teacher, student, load_tokenizer(cfg.teacher.name), tokenizer)
    if lead and before is None:
        if teacher is not None:
            metrics["teacher"] = perplexity(teacher, data.val_dataloader())
        metrics["student_init"] = perplexity(student, data.val_dataloader())
        log.info("before training: %s", metrics)
    if loss is None:
        teacher = None  # evaluated for the report only; CE training never needs it in memory

    extra = [before] if before is not None else []
    trainer, system, fit_s, student = train(
        cfg, student, teacher, loss, data, out, system_overrides={"vocab_size": vocab}, callbacks=extra
    )
    if student is None:
        return {}
    metrics.update(before.metrics if before else {})
    metrics["student"] = perplexity(student, data.val_dataloader())
    export(student, tokenizer, out / "final")
    metrics.update(
        steps=int(trainer.global_step),
        world_size=trainer.world_size,
        # training tokens of all ranks per second of fit, validation time included
        tokens_per_s=round(system.tokens_seen * trainer.world_size / fit_s, 1),
    )
    models = {} if cfg.teacher is None else {"teacher": evaluation_teacher(cfg, teacher, trainer.world_size, student)}
    if "teacher" in models and "teacher" not in metrics:  # CE-only on sharded ranks: measured now, on rank 0
        metrics["params"]["teacher"] = count_params(models["teacher"])
        metrics["teacher"] = perplexity(models["teacher"], data.val_dataloader())
    evaluate_stage(cfg, {**models, "student": student}, tokenizer, out, metrics, trainer.loggers)
    metrics.update(wall_s=round(time.perf_counter() - start, 1), output_dir=str(out))
    write_metrics(metrics, out)
    return metrics
