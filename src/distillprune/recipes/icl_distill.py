"""In-context (context) distillation (Snell et al. 2022; Huang et al. 2022): the teacher answers a query after
k demonstrations, the student sees the query alone and learns to answer as the few-shot teacher does.

The answers to learn are the teacher's own few-shot answers (generated once and stored). ``system.kd_weight``
chooses the loss: 1.0 matches the teacher's few-shot distribution with the student's zero-shot one on the answer
tokens (the two views hold the same answer tokens at different offsets); 0.0 is sequence-level (CE on the
teacher's answers). The packaged tasks (``incontext.PACKAGED``) are built from the training side of the packaged
texts: a word and its capitalised form, a KJV verse and its book, a line and its last word, a passage and whether it
is Shakespeare's or the Bible's. Every accuracy comes with its standard error and the task's chance level (always
giving the most common answer).
"""

from __future__ import annotations

import random
import time
from typing import Any

import lightning as L
from omegaconf import DictConfig

from distillprune import sharded
from distillprune.config import instantiate
from distillprune.data import write_splits
from distillprune.errors import UserError
from distillprune.evaluation.suite import evaluate_stage
from distillprune.generate import chat_prompt, teacher_responses
from distillprune.hardware import run_device
from distillprune.incontext import load_task, standard_error, task_accuracy, two_views
from distillprune.models import export, load_model, load_tokenizer
from distillprune.ranks import rank_and_world
from distillprune.recipes.common import evaluation_teacher, kd_loss, prepare_output_dir, train, write_metrics


def run(cfg: DictConfig) -> dict[str, Any]:
    """Few-shot teacher -> zero-shot student on ``cfg.task``; returns the metrics written to ``metrics.json``."""
    start = time.perf_counter()
    out = prepare_output_dir(cfg)
    loss = kd_loss(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    task = cfg.task
    spec = load_task(task.source, task.n, cfg.seed, task.instruction)
    examples = spec.rows
    rng = random.Random(cfg.seed)
    rng.shuffle(examples)
    n_eval, n_demos = task.n_eval, task.n_demos
    if task.k < 1 or task.k > n_demos:
        raise UserError(f"task.k={task.k} demonstrations asked for, but the demonstration pool has {n_demos}")
    if n_eval + n_demos >= len(examples):
        raise UserError(f"task has {len(examples)} examples: too few for {n_eval} eval + {n_demos} demos + training")
    evals, demos, queries = examples[:n_eval], examples[n_eval : n_eval + n_demos], examples[n_eval + n_demos :]

    tok = load_tokenizer(cfg.teacher.name)
    device = run_device(str(cfg.trainer.accelerator))
    teacher = load_model(**cfg.teacher, device=device, role="teacher")  # whole: every rank generates with it
    how = sharded.loading(cfg)  # under ZeRO-3 / FSDP on several ranks no rank holds a whole student
    student = sharded.load_trained_student(cfg.student, how, cfg, device)
    views = [two_views(q, demos, task, spec.instruction, rng, f"q{i}") for i, q in enumerate(queries)]
    eval_views = [two_views(q, demos, task, spec.instruction, rng, f"e{i}") for i, q in enumerate(evals)]
    few_shot = [{"id": v["id"], "messages": v["teacher"]} for v in views]
    longest = max(len(chat_prompt(tok, p)) for p in few_shot) + cfg.generate.max_new_tokens
    if longest > cfg.data.seq_len:  # say so now, not after minutes of generation
        raise UserError(
            f"demonstrations + query + answer take up to {longest} tokens, more than data.seq_len="
            f"{cfg.data.seq_len}; use fewer or shorter demonstrations (task.k) or a longer seq_len"
        )
    answers = teacher_responses(teacher, tok, few_shot, cfg)
    for v in views:
        v["answer"] = answers[v["id"]]["response"]

    gen, case = cfg.generate, spec.case_sensitive
    accuracy = {}
    if rank_and_world()[0] == 0:  # measured once; the other ranks go on to training
        accuracy = {
            "teacher_zero_shot": task_accuracy(teacher, tok, eval_views, "student", gen, case_sensitive=case),
            "teacher_few_shot": task_accuracy(teacher, tok, eval_views, "teacher", gen, case_sensitive=case),
        }
        if how == "whole":
            accuracy["student_before"] = task_accuracy(student, tok, eval_views, "student", gen, case_sensitive=case)
    before = None
    if how != "whole":  # the sharded student's answers: every rank, inside fit
        before = sharded.BeforeTraining(
            lambda _, system: {
                "student_before": task_accuracy(
                    system.student, tok, eval_views, "student", gen, synced=True, case_sensitive=case
                )
            }
        )
    files = write_splits(out / "data", {"train": views, "val": [{**v, "answer": v["output"]} for v in eval_views]})
    data = instantiate(cfg.data, tokenizer=tok, seed=cfg.seed, source=str(files["train"]), val_source=str(files["val"]))
    extra = [before] if before is not None else []
    trainer, _, fit_s, student = train(
        cfg, student, teacher if loss is not None else None, loss, data, out, callbacks=extra
    )
    if student is None:  # not global rank 0: the training is this rank's whole share
        return {}
    accuracy.update(before.metrics if before is not None else {})
    accuracy["student_after"] = task_accuracy(student, tok, eval_views, "student", gen, case_sensitive=case)
    export(student, tok, out / "final")
    metrics = {
        "task": task.source,
        "accuracy": accuracy,
        "accuracy_se": {name: standard_error(value, n_eval) for name, value in accuracy.items()},
        "chance": spec.chance(evals),
        "examples": {"train": len(queries), "demos": n_demos, "eval": n_eval, "k": task.k},
        "steps": int(trainer.global_step),
        "train_s": round(fit_s, 1),
    }
    models = {"teacher": evaluation_teacher(cfg, teacher, trainer.world_size, student), "student": student}
    evaluate_stage(cfg, models, tok, out, metrics, trainer.loggers)
    metrics.update(wall_s=round(time.perf_counter() - start, 1), output_dir=str(out))
    write_metrics(metrics, out)
    return metrics
