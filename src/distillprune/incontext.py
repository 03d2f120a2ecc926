"""In-context distillation's task and data: few-shot (teacher) and zero-shot (student) views of each example,
their answer accuracy, and the DataModule that trains on both views of the same answer tokens
(``distillprune.recipes.icl_distill`` runs them)."""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distillprune.data import BlocksDataModule, Document, encode_chat, jsonl_rows
from distillprune.errors import UserError
from distillprune.generate import batches, chat_prompt, generate, stop_ids
from distillprune.losses import IGNORE_INDEX
from distillprune.passages import all_speeches, kjv_rows, kjv_verses, verse_lines

Example = dict[str, str]  # {"input", "output"}


@dataclass(frozen=True)
class Task:
    """A task's examples, the instruction its prompts begin with (None: none) and how answers compare."""

    rows: list[Example]
    instruction: str | None
    case_sensitive: bool = False

    def chance(self, rows: list[Example]) -> float:
        """The accuracy of always giving the most common answer of ``rows`` (0.5 for two balanced classes)."""
        counts = Counter(tuple(_words(r["output"], self.case_sensitive)) for r in rows)
        return round(max(counts.values()) / len(rows), 4)


def _shakespeare_or_bible(n: int, rng: random.Random, seed: int) -> list[Example]:
    lines, verses = all_speeches("train", 0.05, seed), kjv_verses(80, 300, "train", 0.05, seed)
    rows = [{"input": s, "output": "Shakespeare"} for s in rng.sample(lines, n // 2)]
    return rows + [{"input": v, "output": "Bible"} for v in rng.sample(verses, n - n // 2)]


def _last_word(n: int, rng: random.Random, seed: int) -> list[Example]:
    lines = rng.sample(verse_lines("train", 0.05, seed), n)
    return [{"input": line, "output": _words(line, case_sensitive=True)[-1]} for line in lines]  # as matched


def _verse_book(n: int, rng: random.Random, seed: int) -> list[Example]:
    rows = rng.sample(kjv_rows(40, 160, "train", 0.05, seed), n)
    return [{"input": f"{r['citation']} {r['text']}", "output": r["book"]} for r in rows]


def _capitalise(n: int, rng: random.Random, seed: int) -> list[Example]:
    words = {w for line in verse_lines("train", 0.05, seed) for w in re.findall(r"\b[a-z]{4,12}\b", line)}
    return [{"input": w, "output": w.capitalize()} for w in rng.sample(sorted(words), n)]


# name (choices.ICL_TASKS) -> (examples from the training side of the packaged texts, instruction,
# case-sensitive); the zero-shot evaluation items come from the held-out plays and chapters
PACKAGED: dict[str, tuple[Any, str, bool]] = {
    "capitalise": (_capitalise, "Write this word with a capital first letter. Answer with the word only.", True),
    "verse_book": (_verse_book, "Which book of the Bible is this verse from? Answer with the book's name only.", False),
    "last_word": (_last_word, "What is the last word of this line? Answer with that word only.", False),
    "shakespeare_or_bible": (
        _shakespeare_or_bible,
        "Is this text from Shakespeare or from the Bible? Answer with one word: Shakespeare or Bible.",
        False,
    ),
}


def load_task(source: str, n: int | None, seed: int, instruction: str | None = "auto") -> Task:
    """A packaged task (``PACKAGED``: ``n`` examples, 600 when None) or a ``.jsonl`` of ``{"input", "output"}``
    rows (compared ignoring case). ``instruction``: ``auto`` takes the packaged task's own (a file: none)."""
    if source in PACKAGED:
        build, own, case_sensitive = PACKAGED[source]
        rows = build(n or 600, random.Random(seed), seed)
        return Task(rows, own if instruction == "auto" else instruction, case_sensitive)
    path = Path(source)
    if not path.is_file():
        raise UserError(f"task '{source}': not a packaged task ({', '.join(PACKAGED)}) and no such file")
    rows = []
    for line, row in jsonl_rows(path):
        if not (isinstance(row.get("input"), str) and isinstance(row.get("output"), str)):
            raise UserError(f"{path} line {line}: expected string fields 'input' and 'output' (got {', '.join(row)})")
        rows.append({"input": row["input"], "output": row["output"]})
    if not rows:
        raise UserError(f"task file {path} is empty")
    return Task(rows[:n] if n else rows, None if instruction == "auto" else instruction)


def _words(text: str, case_sensitive: bool = False) -> list[str]:
    return re.findall(r"[\w']+", text if case_sensitive else text.lower())


def answer_matches(generated: str, gold: str, case_sensitive: bool = False) -> bool:
    """The answer's first words equal the gold answer, ignoring punctuation (and case, unless ``case_sensitive``)."""
    want = _words(gold, case_sensitive)
    return bool(want) and _words(generated, case_sensitive)[: len(want)] == want


def standard_error(accuracy: float, n: int) -> float:
    """The binomial standard error of an accuracy over ``n`` items."""
    return round(math.sqrt(accuracy * (1 - accuracy) / n), 4)


def task_accuracy(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    views: list[dict],
    view: str,
    gen: DictConfig,
    synced: bool = False,
    case_sensitive: bool = False,
) -> float:
    """Greedy accuracy with the ``student`` (zero-shot) or ``teacher`` (few-shot) prompt of each example
    (``synced``: every rank runs the same forward passes, for a model that exists only as shards)."""
    correct = 0
    for chunk in batches(views, gen.batch_size):
        prompts = [chat_prompt(tok, {"messages": v[view]}) for v in chunk]
        stops = stop_ids(model, tok)
        outs = generate(model, prompts, tok.pad_token_id, stops, max_new_tokens=gen.max_new_tokens, synced_gpus=synced)
        for v, o in zip(chunk, outs, strict=True):
            correct += answer_matches(tok.decode(o, skip_special_tokens=True), v["output"], case_sensitive)
    return round(correct / len(views), 4)


def two_views(
    query: Example, demos: list[Example], task: DictConfig, instruction: str | None, rng: random.Random, qid: str
) -> dict[str, Any]:
    """The teacher's view of ``query`` (``task.k`` demonstrations drawn from ``demos``, then the query) and the
    student's (the query alone, with the ``instruction`` only when ``task.student_instruction``)."""
    ask = lambda x: f"{instruction}\n\n{x}" if instruction else x  # noqa: E731
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
