"""Prompt sets for sequence-level distillation: a ``.jsonl`` file, or one built from the packaged corpora.

A prompt row is ``{"id", "prompt"}`` with an optional ``"reference"`` answer. The packaged set asks the teacher to
continue a passage (Shakespeare speeches and KJV verses, cut in half; the real second half is the reference) or to
say in plain words what a line means (no reference).
"""

from __future__ import annotations

import random
from pathlib import Path

from distillprune.errors import UserError
from distillprune.generate import PromptRow
from distillprune.passages import all_speeches, kjv_verses
from distillprune.sources import jsonl_rows


def load_prompts(source: str, n: int | None = None, seed: int = 1234) -> list[PromptRow]:
    """``packaged`` (built from Shakespeare and KJV) or a ``.jsonl`` file with a ``prompt`` field per line."""
    rows = packaged_prompts(n or 288, seed) if source == "packaged" else _file_prompts(Path(source))
    if n is not None:
        rows = rows[:n]
    if not rows:
        raise UserError(f"prompt set '{source}' is empty")
    return rows


def packaged_prompts(n: int, seed: int = 1234) -> list[PromptRow]:
    """``n`` prompts, a third of each kind, drawn deterministically from the packaged corpora."""
    rng = random.Random(seed)
    # the training side of the corpora: the zero-shot items come from the held-out plays and chapters
    speeches, verses = all_speeches("train", 0.05, seed), kjv_verses(80, 300, "train", 0.05, seed)
    rows: list[PromptRow] = []
    for i, passage in enumerate(rng.sample(speeches, n // 3)):
        head, tail = _halves(passage)
        rows.append(
            {"id": f"shk-cont-{i}", "prompt": f"Continue this passage from Shakespeare:\n\n{head}", "reference": tail}
        )
    for i, verse in enumerate(rng.sample(verses, n // 3)):
        head, tail = _halves(verse)
        rows.append(
            {
                "id": f"kjv-cont-{i}",
                "prompt": f"Continue this verse from the King James Bible:\n\n{head}",
                "reference": tail,
            }
        )
    for i, line in enumerate(rng.sample(speeches, n - len(rows))):
        rows.append({"id": f"shk-plain-{i}", "prompt": f"Say in plain words what this line means:\n\n{line}"})
    rng.shuffle(rows)
    return rows


def _halves(text: str) -> tuple[str, str]:
    words = text.split()
    cut = max(1, len(words) // 2)
    return " ".join(words[:cut]), " ".join(words[cut:])


def _file_prompts(path: Path) -> list[PromptRow]:
    if not path.is_file():
        raise UserError(f"prompt file {path} not found")
    rows = []
    for n, row in jsonl_rows(path):
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise UserError(f"{path} line {n}: expected a non-empty 'prompt' string (fields: {', '.join(row)})")
        if "reference" in row and not isinstance(row["reference"], str):
            raise UserError(f"{path} line {n}: 'reference' must be a string")
        rows.append({"id": str(row.get("id", f"line-{n}")), **{k: row[k] for k in ("prompt", "reference") if k in row}})
    return rows
