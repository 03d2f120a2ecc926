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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distillprune.data import chat_ids
from distillprune.errors import UserError
from distillprune.models import eval_mode
from distillprune.ranks import barrier, rank_and_world, shard

log = logging.getLogger(__name__)
PromptRow = dict[str, Any]  # {"id", "prompt" or "messages", optional "reference", ...}


def stop_ids(model: PreTrainedModel, tok: PreTrainedTokenizerBase | None = None) -> list[int]:
    """Every token id that ends a turn: the model's generation config lists them all (Llama-3-Instruct has three),
    the tokenizer's EOS is added when it is not among them."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = [configured] if isinstance(configured, int) else list(configured or [])
    if tok is not None and tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    return ids


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    prompts: list[list[int]],
    pad_id: int,
    eos_ids: int | list[int],
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    use_cache: bool = True,
    seed: int | None = None,
    synced_gpus: bool = False,
) -> list[list[int]]:
    """New tokens for each prompt, up to and including the first stop id (any of ``eos_ids``) when one was
    produced; one left-padded batch. ``synced_gpus``: keep running forward passes until every rank is done, as
    ranks that hold only shards of the model (ZeRO-3, FSDP) must all take part in each one."""
    stops = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
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
    with eval_mode(model):
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            use_cache=use_cache,
            eos_token_id=stops,
            pad_token_id=pad_id,
            top_k=None,
            synced_gpus=synced_gpus,
            **sampling,
        )  # [B, T + new]
    responses = []
    for row in out[:, width:].tolist():
        end = next((i for i, t in enumerate(row) if t in stops), None)
        responses.append(row[: end + 1] if end is not None else row)
    return responses


def fingerprint(obj: Any) -> str:
    """A short stable hash of JSON-able data."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class GenerationStore:
    """Append-only JSON-lines rows ``{"id", ...}`` under ``root/<hash of provenance>/``.

    Each writer appends to a file of its own (``rows.jsonl``; ``rows.rank<r>.jsonl`` when ranks generate
    together), so concurrent writers never interleave; ``rows`` reads them all. Only a writer drops the torn
    last line of its own file; another writer's unfinished last line is skipped, never cut."""

    def __init__(self, root: str | Path, provenance: dict[str, Any], writer: str = "") -> None:
        self.dir = Path(root) / fingerprint(provenance)
        self.path = self.dir / (f"rows.{writer}.jsonl" if writer else "rows.jsonl")
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "provenance.json"
        if not meta.exists():
            tmp = meta.with_name(f"provenance.{os.getpid()}.tmp")  # one temporary file per writer
            tmp.write_text(json.dumps(provenance, indent=2, default=str))
            os.replace(tmp, meta)
        else:
            try:
                stored = json.loads(meta.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise UserError(f"generation store {meta} is corrupt (not JSON); move it away to regenerate") from None
            if stored != json.loads(json.dumps(provenance, default=str)):
                raise UserError(f"generation store {self.dir} was written for other settings ({meta} differs); "
                                "move it away to regenerate")  # fmt: skip
        self._drop_torn_tail()

    def rows(self) -> list[dict[str, Any]]:
        """Every complete row written so far by any writer, each id once; a damaged line before the last of a
        file is a one-line error, and the file is left as it is."""
        rows: dict[str, dict[str, Any]] = {}
        for path in sorted(self.dir.glob("rows*.jsonl")):
            lines = path.read_text(errors="replace").split("\n")
            for n, line in enumerate(lines[:-1], start=1):  # the part after the last newline is unfinished
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if not isinstance(row, dict) or "id" not in row:
                    raise UserError(f"generation store {path} line {n} is corrupt; move the file away to "
                                    "regenerate (it is not deleted)")  # fmt: skip
                rows.setdefault(row["id"], row)
        return list(rows.values())

    def done_ids(self) -> set[str]:
        return {row["id"] for row in self.rows()}

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Write rows to this writer's file and make them durable before returning."""
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
    prompt_set = fingerprint([[p["id"], p.get("messages") or p["prompt"]] for p in prompts])
    encode = lambda p: chat_prompt(tok, p)  # noqa: E731
    return stored_generations(teacher, tok, cfg.teacher.name, prompts, encode, settings, {"prompt_set": prompt_set},
                              gen.batch_size, gen.cache_dir, cfg.seed)  # fmt: skip


def stored_generations(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    model_name: str,
    prompts: list[PromptRow],
    encode: Callable[[PromptRow], list[int]],
    settings: dict[str, Any],
    provenance: dict[str, Any],
    batch_size: int,
    cache_dir: str | Path,
    seed: int,
    extra_stops: tuple[int, ...] = (),
) -> dict[str, dict[str, Any]]:
    """What ``model`` writes after each prompt (``encode``: its token ids) with the generation ``settings``, by
    prompt id: generated once per (model, settings, ``provenance``), stored in ``cache_dir``, resumed where a
    killed run stopped, and shared among ranks (each generates every world-th batch). A row ends at the model's
    stop ids or any of ``extra_stops``."""
    provenance = {
        "teacher": model_name,
        "teacher_config": fingerprint(model.config.to_dict()),
        "dtype": str(model.dtype).removeprefix("torch."),  # as resolved: auto is bf16 on a GPU
        "generation": settings,
        "seed": seed,
        **provenance,
        "n_prompts": len(prompts),
    }
    rank, world = rank_and_world()
    store = GenerationStore(cache_dir, provenance, writer=f"rank{rank}" if world > 1 else "")
    barrier("opening the generation store")  # every rank reads the same rows, so they split the same work
    done = store.done_ids()
    log.info("teacher generation: %d of %d stored in %s", len(done), len(prompts), store.dir)
    stops = stop_ids(model, tok)
    stops += [t for t in extra_stops if t not in stops]
    # fixed batches (a resumed run seeds them as the first did); with several ranks, each takes every world-th
    chunks = [c for c in batches(prompts, batch_size) if any(p["id"] not in done for p in c)]
    for chunk in shard(chunks):
        todo = [p for p in chunk if p["id"] not in done]
        chunk_seed = seed + int(fingerprint([p["id"] for p in chunk]), 16) % 1_000_000
        outs = generate(model, [encode(p) for p in todo], tok.pad_token_id, stops, seed=chunk_seed, **settings)
        store.append(
            [
                {**p, "response": tok.decode(o, skip_special_tokens=True).strip(), "response_ids": o}
                for p, o in zip(todo, outs, strict=True)
            ]
        )
        done.update(p["id"] for p in todo)
        log.info("teacher generation (rank %d of %d): %d/%d", rank, world, len(done), len(prompts))
    barrier("teacher generation")
    rows = {r["id"]: r for r in store.rows()}
    return {p["id"]: rows[p["id"]] for p in prompts}


def chat_prompt(tok: PreTrainedTokenizerBase, row: PromptRow) -> list[int]:
    """Token ids of a prompt row (its ``messages``, or one user turn of its ``prompt``), the assistant's turn open."""
    messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
    return chat_ids(tok, messages, add_generation_prompt=True)
