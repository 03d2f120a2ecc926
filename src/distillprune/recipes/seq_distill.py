"""Sequence-level distillation (Kim & Rush 2016): the teacher writes the answers, the student learns them.

Stages, in order (``stages`` in the recipe): ``generate`` (teacher responses, batched with the KV cache, stored
and reused), ``train`` (CE on the responses with the prompt masked, plus ``system.kd_weight``·KD on the same
tokens), ``evaluate`` (the student's greedy agreement with the teacher on held-out prompts, before and after; and a
student trained on the prompt set's reference answers, for comparison).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distillprune import sharded
from distillprune.choices import SEQ_STAGES
from distillprune.config import instantiate
from distillprune.data import split_documents, write_splits
from distillprune.errors import UserError
from distillprune.evaluation.metrics import rouge_l, token_match
from distillprune.evaluation.suite import evaluate_stage
from distillprune.generate import PromptRow, batches, chat_prompt, generate, stop_ids, teacher_responses
from distillprune.hardware import run_device
from distillprune.models import export, load_model, load_student, load_tokenizer
from distillprune.prompts import load_prompts
from distillprune.ranks import rank_and_world
from distillprune.recipes.common import evaluation_teacher, kd_loss, prepare_output_dir, train, write_metrics

log = logging.getLogger(__name__)
STAGES = SEQ_STAGES


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the recipe's stages; returns the metrics written to ``metrics.json``."""
    start = time.perf_counter()
    if unknown := set(cfg.stages) - set(STAGES):
        raise UserError(f"unknown stage(s) {sorted(unknown)}; stages are {', '.join(STAGES)}")
    out = prepare_output_dir(cfg)
    loss = kd_loss(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    tok = load_tokenizer(cfg.teacher.name)
    prompts = load_prompts(cfg.prompts.source, cfg.prompts.n, cfg.seed)
    train_docs, eval_docs = split_documents([(p["id"], p) for p in prompts], cfg.prompts.eval_fraction, cfg.seed)
    train_prompts, eval_prompts = [p for _, p in train_docs], [p for _, p in eval_docs]
    device = run_device(str(cfg.trainer.accelerator))
    teacher = load_model(**cfg.teacher, device=device, role="teacher")
    metrics: dict[str, Any] = {"prompts": {"train": len(train_prompts), "eval": len(eval_prompts)}}

    gen_start = time.perf_counter()
    responses = teacher_responses(teacher, tok, prompts, cfg)
    metrics["generate_s"] = round(time.perf_counter() - gen_start, 1)
    if "train" not in cfg.stages and "evaluate" not in cfg.stages:
        return _finish(metrics, out, start)

    files = _write_training_files(out / "data", train_prompts, eval_prompts, responses)
    how = sharded.loading(cfg) if "train" in cfg.stages else "whole"  # ZeRO-3 / FSDP: no whole student per rank
    student = sharded.load_trained_student(cfg.student, how, cfg, device)
    before = None
    if "evaluate" in cfg.stages and how != "whole":  # the sharded student's answers: every rank, inside fit
        before = sharded.BeforeTraining(
            lambda _, system: {"before": agreement(system.student, tok, eval_prompts, responses, cfg, synced=True)}
        )
    elif "evaluate" in cfg.stages and rank_and_world()[0] == 0:  # measured once; the other ranks only train
        metrics["teacher_agreement"] = {"before": agreement(student, tok, eval_prompts, responses, cfg)}
    trainer = None
    if "train" in cfg.stages:
        data = instantiate(
            cfg.data, tokenizer=tok, seed=cfg.seed, source=str(files["train"]), val_source=str(files["val"])
        )
        keep_teacher = teacher if loss is not None else None
        extra = [before] if before is not None else []
        trainer, _, fit_s, student = train(cfg, student, keep_teacher, loss, data, out, callbacks=extra)
        if student is None:  # not global rank 0: the training is this rank's whole share
            return {}
        if before is not None:
            metrics["teacher_agreement"] = dict(before.metrics)
        metrics.update(steps=int(trainer.global_step), train_s=round(fit_s, 1))
        export(student, tok, out / "final")
        if trainer.world_size > 1 and cfg.reference_student:
            log.info("reference student skipped: it is a second training run, compared on one process only")
            cfg.reference_student = False
    if "evaluate" in cfg.stages:
        metrics["teacher_agreement"]["after"] = agreement(student, tok, eval_prompts, responses, cfg)
        if cfg.reference_student and "reference" in files and "train" in cfg.stages:
            metrics["teacher_agreement"]["reference_student"] = _reference_student(
                cfg, tok, files, eval_prompts, responses, out
            )
        world = trainer.world_size if trainer is not None else 1
        models = {"teacher": evaluation_teacher(cfg, teacher, world, student), "student": student}
        evaluate_stage(cfg, models, tok, out, metrics, trainer.loggers if trainer is not None else [])
    return _finish(metrics, out, start)


def agreement(
    student: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: list[PromptRow],
    responses: dict[str, dict[str, Any]],
    cfg: DictConfig,
    synced: bool = False,
) -> dict[str, float]:
    """Mean ROUGE-L and token match of the student's greedy answers against the teacher's (``synced``: every rank
    runs the same forward passes, for a student that exists only as shards)."""
    scores = {"rouge_l": 0.0, "token_match": 0.0}
    for chunk in batches(prompts, cfg.generate.batch_size):
        outs = generate(
            student,
            [chat_prompt(tok, p) for p in chunk],
            tok.pad_token_id,
            stop_ids(student, tok),
            max_new_tokens=cfg.generate.max_new_tokens,
            synced_gpus=synced,
        )
        for p, o in zip(chunk, outs, strict=True):
            teacher = responses[p["id"]]
            scores["rouge_l"] += rouge_l(tok.decode(o, skip_special_tokens=True).strip(), teacher["response"])
            scores["token_match"] += token_match(o, teacher["response_ids"])
    return {k: round(v / len(prompts), 4) for k, v in scores.items()}


def _write_training_files(
    folder: Path, train_prompts: list[PromptRow], eval_prompts: list[PromptRow], responses: dict[str, dict]
) -> dict[str, Path]:
    files = {
        "train": [{"prompt": p["prompt"], "response": responses[p["id"]]["response"]} for p in train_prompts],
        "val": [{"prompt": p["prompt"], "response": responses[p["id"]]["response"]} for p in eval_prompts],
        "reference": [{"prompt": p["prompt"], "response": p["reference"]} for p in train_prompts if "reference" in p],
    }
    return write_splits(folder, files)


def _reference_student(
    cfg: DictConfig,
    tok: PreTrainedTokenizerBase,
    files: dict[str, Path],
    eval_prompts: list[PromptRow],
    responses: dict[str, dict],
    out: Path,
) -> dict[str, float]:
    """The same student and steps, trained with CE on the reference answers instead of the teacher's."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    student = load_student(**cfg.student, device=run_device(str(cfg.trainer.accelerator)))
    data = instantiate(
        cfg.data, tokenizer=tok, seed=cfg.seed, source=str(files["reference"]), val_source=str(files["val"])
    )
    *_, student = train(
        cfg, student, None, None, data, out / "reference_student", system_overrides={"kd_weight": 0.0, "lmbda": 0.0}
    )
    return agreement(student, tok, eval_prompts, responses, cfg)


def _finish(metrics: dict[str, Any], out: Path, start: float) -> dict[str, Any]:
    metrics.update(wall_s=round(time.perf_counter() - start, 1), output_dir=str(out))
    write_metrics(metrics, out)
    return metrics
