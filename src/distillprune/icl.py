"""In-context (context) distillation (Snell et al. 2022; Huang et al. 2022): the teacher answers a query after
k demonstrations, the student sees the query alone and learns to answer as the few-shot teacher does.

The answers to learn are the teacher's own few-shot answers (generated once and stored). ``system.kd_weight``
chooses the loss: 1.0 matches the teacher's few-shot distribution with the student's zero-shot one on the answer
tokens (the two views hold the same answer tokens at different offsets); 0.0 is sequence-level (CE on the
teacher's answers). The packaged task asks whether a line is from Shakespeare or the Bible, in one word: the
zero-shot teacher answers in sentences, the few-shot teacher in the demonstrated format.
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path
from typing import Any

import lightning as L
from datasets import Dataset
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distillprune.config import instantiate
from distillprune.data import (
    IGNORE_INDEX,
    Document,
    _BlocksDataModule,
    _jsonl_rows,
    encode_chat,
    load_documents,
    write_splits,
)
from distillprune.errors import UserError
from distillprune.evaluation import evaluate_stage
from distillprune.generate import batches, chat_prompt, generate, stop_ids, teacher_responses
from distillprune.hardware import run_device
from distillprune.models import export, load_model, load_student, load_tokenizer
from distillprune.pipeline import evaluation_teacher, kd_loss, prepare_output_dir, train, write_metrics
from distillprune.prompts import _kjv_verses, _speeches
from distillprune.ranks import rank_and_world

Example = dict[str, str]  # {"input", "output"}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Few-shot teacher -> zero-shot student on ``cfg.task``; returns the metrics written to ``metrics.json``."""
    start = time.perf_counter()
    out = prepare_output_dir(cfg)
    loss = kd_loss(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    task = cfg.task
    examples = load_task(task.source, task.n, cfg.seed)
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
    teacher = load_model(**cfg.teacher, device=device, role="teacher")
    student = load_student(**cfg.student, device=device)
    views = [_views(q, demos, task, rng, f"q{i}") for i, q in enumerate(queries)]
    eval_views = [_views(q, demos, task, rng, f"e{i}") for i, q in enumerate(evals)]
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

    gen = cfg.generate
    accuracy = {}
    if rank_and_world()[0] == 0:  # measured once; the other ranks go on to training
        accuracy = {
            "teacher_zero_shot": task_accuracy(teacher, tok, eval_views, "student", gen),
            "teacher_few_shot": task_accuracy(teacher, tok, eval_views, "teacher", gen),
            "student_before": task_accuracy(student, tok, eval_views, "student", gen),
        }
    files = write_splits(out / "data", {"train": views, "val": [{**v, "answer": v["output"]} for v in eval_views]})
    data = instantiate(cfg.data, tokenizer=tok, seed=cfg.seed, source=str(files["train"]), val_source=str(files["val"]))
    trainer, _, fit_s, student = train(cfg, student, teacher if loss is not None else None, loss, data, out)
    if student is None:  # not global rank 0: the training is this rank's whole share
        return {}
    accuracy["student_after"] = task_accuracy(student, tok, eval_views, "student", gen)
    export(student, tok, out / "final")
    metrics = {
        "accuracy": accuracy,
        "examples": {"train": len(queries), "demos": n_demos, "eval": n_eval, "k": task.k},
        "steps": int(trainer.global_step),
        "train_s": round(fit_s, 1),
    }
    models = {"teacher": evaluation_teacher(cfg, teacher, trainer.world_size, student), "student": student}
    evaluate_stage(cfg, models, tok, out, metrics, trainer.loggers)
    metrics.update(wall_s=round(time.perf_counter() - start, 1), output_dir=str(out))
    write_metrics(metrics, out)
    return metrics


def load_task(source: str, n: int | None, seed: int) -> list[Example]:
    """``shakespeare_or_bible`` (packaged) or a ``.jsonl`` of ``{"input", "output"}`` rows."""
    if source == "shakespeare_or_bible":
        rng = random.Random(seed)
        lines = [s for _, text in load_documents("shakespeare") for s in _speeches(text)]
        verses = [v for v in _kjv_verses() if 80 <= len(v) <= 300]
        half = (n or 320) // 2
        rows = [{"input": s, "output": "Shakespeare"} for s in rng.sample(lines, half)]
        rows += [{"input": v, "output": "Bible"} for v in rng.sample(verses, half)]
        return rows
    path = Path(source)
    if not path.is_file():
        raise UserError(f"task '{source}': not a packaged task (shakespeare_or_bible) and no such file")
    rows = []
    for line, row in _jsonl_rows(path):
        if not (isinstance(row.get("input"), str) and isinstance(row.get("output"), str)):
            raise UserError(f"{path} line {line}: expected string fields 'input' and 'output' (got {', '.join(row)})")
        rows.append({"input": row["input"], "output": row["output"]})
    if not rows:
        raise UserError(f"task file {path} is empty")
    return rows[:n] if n else rows


def answer_matches(generated: str, gold: str) -> bool:
    """The answer's first words equal the gold answer, ignoring case and punctuation."""
    words = lambda text: re.findall(r"[\w']+", text.lower())  # noqa: E731
    want = words(gold)
    return bool(want) and words(generated)[: len(want)] == want


def task_accuracy(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, views: list[dict], view: str, gen: DictConfig
) -> float:
    """Greedy accuracy with the ``student`` (zero-shot) or ``teacher`` (few-shot) prompt of each example."""
    correct = 0
    for chunk in batches(views, gen.batch_size):
        prompts = [chat_prompt(tok, {"messages": v[view]}) for v in chunk]
        outs = generate(model, prompts, tok.pad_token_id, stop_ids(model, tok), max_new_tokens=gen.max_new_tokens)
        for v, o in zip(chunk, outs, strict=True):
            correct += answer_matches(tok.decode(o, skip_special_tokens=True), v["output"])
    return round(correct / len(views), 4)


def _views(query: Example, demos: list[Example], task: DictConfig, rng: random.Random, qid: str) -> dict[str, Any]:
    ask = lambda x: f"{task.instruction}\n\n{x}" if task.instruction else x  # noqa: E731
    shots = []
    for d in rng.sample(demos, task.k):
        shots += [{"role": "user", "content": ask(d["input"])}, {"role": "assistant", "content": d["output"]}]
    student_query = ask(query["input"]) if task.student_instruction else query["input"]
    return {
        "id": qid,
        "teacher": shots + [{"role": "user", "content": ask(query["input"])}],
        "student": [{"role": "user", "content": student_query}],
        "output": query["output"],
    }


class InContextDataModule(_BlocksDataModule):
    """Rows ``{"teacher": messages, "student": messages, "answer"}`` as two views of the same answer tokens."""

    def encode(self, docs: list[Document]) -> Dataset:
        rows = []
        for doc_id, row in docs:
            rows.append(encode_views(row, self.tokenizer, self.seq_len, doc_id))
        return Dataset.from_list(rows)


def encode_views(row: dict, tok: PreTrainedTokenizerBase, seq_len: int, where: str = "row") -> dict[str, Any]:
    """Student and teacher token views of one example; their target tokens are checked to be identical."""
    answer = [{"role": "assistant", "content": row["answer"]}]
    student = encode_chat(row["student"] + answer, tok, 10**9)
    teacher = encode_chat(row["teacher"] + answer, tok, 10**9, last_turn_only=True)
    if len(teacher["input_ids"]) > seq_len:
        raise UserError(
            f"{where}: demonstrations + query + answer take {len(teacher['input_ids'])} tokens, more than "
            f"data.seq_len={seq_len}; use fewer or shorter demonstrations (task.k) or a longer seq_len"
        )
    targets = lambda enc: [t for t in enc["labels"] if t != IGNORE_INDEX]  # noqa: E731
    if targets(student) != targets(teacher):
        raise UserError(f"{where}: the answer tokenises differently after the few-shot context")
    return {
        **student,
        "teacher_input_ids": teacher["input_ids"],
        "teacher_labels": teacher["labels"],
        "teacher_prompt_len": teacher["prompt_len"],
    }
