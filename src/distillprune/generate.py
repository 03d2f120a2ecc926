"""Batched generation with the KV cache, and a resumable on-disk store of what a teacher wrote.

Prompts are left-padded so that every row's next token sits at the last position; ``generate`` stops a row at
EOS. ``GenerationStore`` appends one JSON line per prompt and fsyncs after every batch: a killed run loses at
most the batch it was writing, a torn last line is dropped on the next open, and rows already written are
skipped, so nothing is duplicated or lost. The store's file name is a hash of its provenance (teacher, generation
settings, prompt-set hash): changing any of them starts a new store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distillprune.data import chat_ids

log = logging.getLogger(__name__)
PromptRow = dict[str, Any]  # {"id", "prompt" or "messages", optional "reference", ...}


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    prompts: list[list[int]],
    pad_id: int,
    eos_id: int,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    use_cache: bool = True,
    seed: int | None = None,
) -> list[list[int]]:
    """New tokens for each prompt, up to and including EOS when one was produced; one left-padded batch."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # [B, T]
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    if seed is not None:
        torch.manual_seed(seed)
    sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        use_cache=use_cache,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        top_k=None,
        **sampling,
    )  # [B, T + new]
    model.train(was_training)
    responses = []
    for row in out[:, width:].tolist():
        responses.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return responses


def fingerprint(obj: Any) -> str:
    """A short stable hash of JSON-able data."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class GenerationStore:
    """Append-only JSON-lines rows ``{"id", ...}`` under ``root/<hash of provenance>/``."""

    def __init__(self, root: str | Path, provenance: dict[str, Any]) -> None:
        self.dir = Path(root) / fingerprint(provenance)
        self.path = self.dir / "rows.jsonl"
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "provenance.json"
        if not meta.exists():
            tmp = meta.with_suffix(".tmp")
            tmp.write_text(json.dumps(provenance, indent=2, default=str))
            os.replace(tmp, meta)
        self._drop_torn_tail()

    def rows(self) -> list[dict[str, Any]]:
        """Every complete row written so far."""
        if not self.path.exists():
            return []
        with self.path.open() as f:
            return [json.loads(line) for line in f if line.strip()]

    def done_ids(self) -> set[str]:
        return {row["id"] for row in self.rows()}

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Write rows and make them durable before returning."""
        with self.path.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _drop_torn_tail(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # a write cut short by a kill: keep whole lines only
            with self.path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)


def batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive slices of ``size`` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def teacher_responses(
    teacher: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: list[PromptRow], cfg: DictConfig
) -> dict[str, dict[str, Any]]:
    """The teacher's answer to every prompt, generated once per (teacher, settings, prompt set) and stored."""
    gen = cfg.generate
    settings = {k: gen[k] for k in ("max_new_tokens", "do_sample", "temperature", "top_p")}
    provenance = {
        "teacher": cfg.teacher.name,
        "teacher_config": fingerprint(teacher.config.to_dict()),
        "dtype": cfg.teacher.dtype,
        "generation": settings,
        "seed": cfg.seed,
        "prompt_set": fingerprint([[p["id"], p.get("messages") or p["prompt"]] for p in prompts]),
        "n_prompts": len(prompts),
    }
    store = GenerationStore(gen.cache_dir, provenance)
    done = store.done_ids()
    log.info("teacher generation: %d of %d stored in %s", len(done), len(prompts), store.dir)
    for chunk in batches(prompts, gen.batch_size):  # fixed batches: a resumed run seeds them as the first did
        todo = [p for p in chunk if p["id"] not in done]
        if not todo:
            continue
        seed = cfg.seed + int(fingerprint([p["id"] for p in chunk]), 16) % 1_000_000
        outs = generate(
            teacher, [chat_prompt(tok, p) for p in todo], tok.pad_token_id, tok.eos_token_id, seed=seed, **settings
        )
        store.append(
            [
                {**p, "response": tok.decode(o, skip_special_tokens=True).strip(), "response_ids": o}
                for p, o in zip(todo, outs, strict=True)
            ]
        )
        done.update(p["id"] for p in todo)
        log.info("teacher generation: %d/%d", len(done), len(prompts))
    rows = {r["id"]: r for r in store.rows()}
    return {p["id"]: rows[p["id"]] for p in prompts}


def chat_prompt(tok: PreTrainedTokenizerBase, row: PromptRow) -> list[int]:
    """Token ids of a prompt row (its ``messages``, or one user turn of its ``prompt``), the assistant's turn open."""
    messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
    return chat_ids(tok, messages, add_generation_prompt=True)
