"""The ``teacher_logits`` stage of ``logit_distill``: the teacher's top-k targets for the rows a run trains on,
stored once (``distillprune.logit_store``); training then reads them and keeps no teacher in memory."""

from __future__ import annotations

import gc
import json
import logging
import time
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distillprune.errors import UserError
from distillprune.generate import fingerprint
from distillprune.logit_store import FORMAT, LocalTeacher, LogitStore, build, fingerprint_rows, rows_for_steps
from distillprune.models import load_config, load_model, load_tokenizer
from distillprune.ranks import barrier, rank_and_world
from distillprune.served import ServedTeacher

log = logging.getLogger(__name__)
_CONFIG_NOISE = ("dtype", "torch_dtype", "attn_implementation", "transformers_version", "architectures")


def offline_teacher(
    cfg: DictConfig, data: Any, tokenizer: PreTrainedTokenizerBase, student: PreTrainedModel, device: torch.device
) -> tuple[LogitStore, int | None, dict[str, Any]]:
    """Open this run's store (``teacher_store``), build the rows it misses when ``stages`` has ``teacher_logits``,
    and hand it to ``data``; returns the store, the vocabulary the loss compares and the store's metrics."""
    spec, stages = cfg.teacher_store, list(cfg.stages)
    vocab, teacher_rows = _vocab(cfg, tokenizer, student)
    server = _server(spec, min(int(spec.k), vocab or teacher_rows), tokenizer, vocab or teacher_rows)
    provenance = {
        "format": FORMAT,
        "teacher": str(cfg.teacher.name),
        "teacher_dtype": str(cfg.teacher.dtype),  # the setting: a GPU-built store serves a CPU run of it too
        "source": "local" if server is None else f"served {server.model} ({server.api})",
        "teacher_config": fingerprint(_config_key(cfg)),
        "tokenizer": fingerprint(sorted(tokenizer.get_vocab().items())),
        "data": fingerprint_rows(data.train_set.with_format(None)),
        "data_rows": len(data.train_set),
        "k": min(int(spec.k), vocab or teacher_rows),
        "temperature": float(cfg.loss.temperature),
        "vocab": vocab or teacher_rows,
    }
    rank, world = rank_and_world()
    store = LogitStore(spec.dir, provenance, path=spec.path, writer=f"r{rank}")
    per_step = int(cfg.data.batch_size) * int(cfg.trainer.accumulate_grad_batches) * world
    rows = rows_for_steps(len(data.train_set), int(cfg.seed), per_step, int(cfg.trainer.max_steps), world)
    missing = store.missing(rows)
    barrier("opening the teacher store")  # every rank sees the same rows missing before any rank writes
    metrics: dict[str, Any] = {"dir": str(store.dir), "k": store.k, "rows": len(rows), "rows_built": 0}
    if missing and "teacher_logits" not in stages:
        raise UserError(f"teacher store {store.dir} holds {len(rows) - len(missing)} of the {len(rows)} rows this "
                        "run trains on; add teacher_logits to stages to build the rest")  # fmt: skip
    if missing:
        start = time.perf_counter()
        source = server or LocalTeacher(load_model(**cfg.teacher, device=device, role="teacher"), store.k,
                                        tokenizer.pad_token_id, provenance["temperature"], vocab)  # fmt: skip
        log.info("teacher store: building %d rows (k=%d) from the %s teacher in %s", len(missing), store.k,
                 provenance["source"], store.dir)  # fmt: skip
        built = build(store, source, data.train_set.with_format(None), missing, int(spec.batch_size),
                      int(spec.shard_rows))  # fmt: skip
        del source
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        barrier("building the teacher store")  # every rank wrote its share; all read them all
        store.reindex()
        if still := store.missing(rows):
            raise UserError(f"teacher store {store.dir}: {len(still)} rows are still missing after the build")
        metrics.update(rows_built=len(missing), build_s=round(time.perf_counter() - start, 1))
        if server is not None:  # re-tokenised context (llama_cpp_python) or a dropped first position
            metrics["positions_without_teacher"] = server.positions_without
            log.info("teacher store: %d target positions got no distribution from the server (this rank)",
                     server.positions_without)  # fmt: skip
        log.info("teacher store: this rank built %d rows in %.1f s", built["rows_built"], built["build_s"])
    positions = store.positions()
    metrics.update(
        positions=positions,
        bytes=store.nbytes(),
        bytes_per_token=round(store.nbytes() / max(positions, 1), 1),
    )
    if rank == 0:
        (store.dir / "last_use.json").write_text(json.dumps(metrics, indent=2))
    data.teacher_store = store
    return store, vocab, metrics


def _server(spec: DictConfig, k: int, tokenizer: PreTrainedTokenizerBase, vocab: int) -> ServedTeacher | None:
    server = spec.get("server")
    if server is None or server.url is None:
        return None
    return ServedTeacher(str(server.url), server.model, str(server.api), k, tokenizer, vocab,
                         int(server.concurrency), float(server.timeout_s))  # fmt: skip


def _vocab(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, student: PreTrainedModel) -> tuple[int | None, int]:
    """What ``models.shared_vocab_size`` gives, from the teacher's config instead of its weights: None when the
    two heads have the same rows, else the tokenizer's size; and the teacher's head rows."""
    if load_tokenizer(cfg.teacher.name).get_vocab() != tokenizer.get_vocab():
        raise UserError("teacher and student tokenizers differ; logit distillation needs a shared vocabulary")
    teacher_rows = int(_teacher_config(cfg).vocab_size)
    student_rows = int(student.get_output_embeddings().weight.shape[0])
    if teacher_rows == student_rows:
        return None, teacher_rows
    if min(teacher_rows, student_rows) < len(tokenizer):
        raise UserError(f"teacher vocab ({teacher_rows}) and student vocab ({student_rows}) differ and one is "
                        "smaller than the tokenizer")  # fmt: skip
    return len(tokenizer), teacher_rows


def _teacher_config(cfg: DictConfig) -> Any:
    return load_config(cfg.teacher.name, bool(cfg.teacher.trust_remote_code))


def _config_key(cfg: DictConfig) -> dict[str, Any]:
    """The teacher's config without the fields that a load setting changes (dtype, attention, versions)."""
    return {k: v for k, v in _teacher_config(cfg).to_dict().items() if k not in _CONFIG_NOISE and not k.startswith("_")}
