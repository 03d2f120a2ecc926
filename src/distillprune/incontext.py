"""In-context distillation's task and data: few-shot (teacher) and zero-shot (student) views of each example,
their answer accuracy, and the DataModule that trains on both views of the same answer tokens
(``distillprune.recipes.icl_distill`` runs them)."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

from datasets import Dataset
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distillprune.data import BlocksDataModule, Document, encode_chat, jsonl_rows
from distillprune.errors import UserError
from distillprune.generate import batches, chat_prompt, generate, stop_ids
from distillprune.losses import IGNORE_INDEX
from distillprune.passages import all_speeches, kjv_verses

Example = dict[str, str]  # {"input", "output"}


def load_task(source: str, n: int | None, seed: int) -> list[Example]:
    """``shakespeare_or_bible`` (packaged) or a ``.jsonl`` of ``{"input", "output"}`` rows."""
    if source == "shakespeare_or_bible":
        rng = random.Random(seed)
        # the training side of the corpora: the zero-shot items come from the held-out plays and chapters
        lines, verses = all_speeches("train", 0.05, seed), kjv_verses(80, 300, "train", 0.05, seed)
        half = (n or 320) // 2
        rows = [{"input": s, "output": "Shakespeare"} for s in rng.sample(lines, half)]
        rows += [{"input": v, "output": "Bible"} for v in rng.sample(verses, half)]
        return rows
    path = Path(source)
    if not path.is_file():
        raise UserError(f"task '{source}': not a packaged task (shakespeare_or_bible) and no such file")
    rows = []
    for line, row in jsonl_rows(path):
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
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    views: list[dict],
    view: str,
    gen: DictConfig,
    synced: bool = False,
) -> float:
    """Greedy accuracy with the ``student`` (zero-shot) or ``teacher`` (few-shot) prompt of each example
    (``synced``: every rank runs the same forward passes, for a model that exists only as shards)."""
    correct = 0
    for chunk in batches(views, gen.batch_size):
        prompts = [chat_prompt(tok, {"messages": v[view]}) for v in chunk]
        stops = stop_ids(model, tok)
        outs = generate(model, prompts, tok.pad_token_id, stops, max_new_tokens=gen.max_new_tokens, synced_gpus=synced)
        for v, o in zip(chunk, outs, strict=True):
            correct += answer_matches(tok.decode(o, skip_special_tokens=True), v["output"])
    return round(correct / len(views), 4)


def two_views(query: Example, demos: list[Example], task: DictConfig, rng: random.Random, qid: str) -> dict[str, Any]:
    """The teacher's view of ``query`` (``task.k`` demonstrations drawn from ``demos``, then the query) and the
    student's (the query alone, with the instruction only when ``task.student_instruction``)."""
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


class InContextDataModule(BlocksDataModule):
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
