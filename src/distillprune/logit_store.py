"""An offline teacher: its top-k next-token log-probabilities at every target position of a dataset, written once.

The store sits in ``root/<hash of provenance>/`` (teacher, its config and dtype, the tokenizer, the training rows,
k, temperature and vocabulary): ``provenance.json`` and safetensors shards, each holding whole training rows:

- ``rows`` ``[R]`` int64, the dataset indices; ``offsets`` ``[R + 1]`` int64 into the position tensors;
- ``ids`` ``[N, k]`` int32 and ``logprobs`` ``[N, k]`` float16: the teacher's k most likely next tokens at each
  of the rows' N target positions and their log-probabilities at the loss temperature;
- ``tail`` ``[N]`` float32: the log of the probability mass outside those k (one extra bucket for the loss).

Shards are written to a temporary file and renamed, so a killed build leaves whole shards only; a later build adds
the rows that are missing. A shard that cannot be read whole (cut short by a copy, a full disk) is moved aside
as ``*.damaged`` and its rows are rebuilt; every readable shard is kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from distillprune.errors import UserError

log = logging.getLogger(__name__)
FORMAT = "distillprune-topk-1"
FLOOR = -1.0e4  # log-probabilities below this count as 0 (exp underflows): keeps empty buckets finite
_FAR = -1.0e30  # a finite "minus infinity" for masked logits: logsumexp of a fully masked row stays finite


@dataclass
class TopK:
    """A sparse teacher distribution per target position: ``ids`` ``[N, k]``, ``logprobs`` ``[N, k]`` (log p of
    each id at the loss temperature) and ``tail`` ``[N]`` (log of the mass of every other token)."""

    ids: Tensor
    logprobs: Tensor
    tail: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.ids.shape)

    def __getitem__(self, rows: slice | Tensor) -> TopK:
        return TopK(self.ids[rows], self.logprobs[rows], self.tail[rows])

    def to(self, device: torch.device | str) -> TopK:
        return TopK(self.ids.to(device), self.logprobs.to(device), self.tail.to(device))

    def buckets(self, student: Tensor) -> tuple[Tensor, Tensor]:
        """Student and teacher log-probabilities over k + 1 buckets (the k ids, then every other token), from the
        student's temperature-scaled logits ``[N, V]``; both ``[N, k + 1]``. With k = V the tail is empty and
        any divergence of the buckets is the divergence of the full distributions."""
        pad = self.ids < 0  # [N, k]: no token (a served teacher named fewer than k that this vocabulary has)
        ids = self.ids.clamp_min(0).long()
        log_z = torch.logsumexp(student, dim=-1, keepdim=True)  # [N, 1]
        top = (student.gather(1, ids) - log_z).masked_fill(pad, FLOOR)  # [N, k]; an empty bucket for both sides
        if pad.any():  # only the named ids leave the rest (a padded slot's stand-in id 0 may be a rest token)
            named = torch.zeros_like(student).scatter_add_(1, ids, (~pad).to(student.dtype)) > 0  # [N, V]
            rest = student.masked_fill(named, _FAR).logsumexp(dim=-1, keepdim=True) - log_z  # [N, 1]
        else:
            rest = student.scatter(1, ids, _FAR).logsumexp(dim=-1, keepdim=True) - log_z  # [N, 1]
        log_q = torch.cat([top, rest], dim=-1).clamp_min(FLOOR)
        # the stored values are rounded (float16): renormalised over the buckets, they are a distribution again
        log_p = torch.cat([self.logprobs.float().masked_fill(pad, FLOOR), self.tail.float()[:, None]], dim=-1)
        return log_q, F.log_softmax(log_p, dim=-1).clamp_min(FLOOR)


def top_k(logits: Tensor, k: int, temperature: float = 1.0) -> TopK:
    """The teacher's top-k of ``logits`` ``[N, V]`` at ``temperature`` (float32 math), stored precision."""
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)  # [N, V]
    values, ids = log_p.topk(min(k, log_p.shape[-1]), dim=-1)  # [N, k]
    tail = log_p.scatter(1, ids, float("-inf")).logsumexp(dim=-1)  # [N]; -inf when k = V
    return TopK(ids.to(torch.int32), values.to(torch.float16), tail.float())


def fingerprint_rows(rows: Iterable[dict[str, Any]]) -> str:
    """A hash of a dataset's token ids and labels, row by row (the data half of a store's provenance)."""
    h = hashlib.sha256()
    for row in rows:
        h.update(torch.tensor(row["input_ids"], dtype=torch.int64).numpy().tobytes())
        if "labels" in row:
            h.update(b"L" + torch.tensor(row["labels"], dtype=torch.int64).numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


class LogitStore:
    """The store for one provenance: ``root/<hash>/`` (or the folder ``path`` itself, when a store made elsewhere is
    named, whose provenance must then be this run's).

    Args:
        root: the folder that holds one store per provenance.
        provenance: what the store was computed from (JSON-able); part of the folder name.
        path: an existing store folder to use instead of ``root/<hash>``.
        writer: this process's shard-name prefix (one per rank, so ranks never write the same file).
    """

    def __init__(
        self, root: str | Path, provenance: dict[str, Any], path: str | Path | None = None, writer: str = "r0"
    ) -> None:
        self.provenance = json.loads(json.dumps(provenance, default=str))
        digest = hashlib.sha256(json.dumps(self.provenance, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = Path(path) if path is not None else Path(root) / digest
        self.k = int(self.provenance["k"])
        self.writer = writer
        self._handles: dict[Path, Any] = {}
        self._index: dict[int, tuple[Path, int]] = {}
        self._check_provenance(explicit=path is not None)
        self.reindex()

    # ------------------------------------------------------------------------------------------ reading

    def reindex(self) -> None:
        """Read every shard's row list; a shard that is not whole is moved aside and its rows count as missing."""
        self._handles.clear()
        self._index.clear()
        for shard in sorted(self.dir.glob("shard-*.safetensors")):
            try:
                rows = self._rows_of(shard)
            except Exception as err:  # noqa: BLE001 - any failure to read a shard whole means it is damaged
                aside = shard.with_name(shard.name + ".damaged")
                with contextlib.suppress(FileNotFoundError):  # another rank, opening the store too, moved it first
                    os.replace(shard, aside)
                log.warning("teacher store: %s is damaged (%s); moved to %s, its rows are rebuilt", shard, err, aside)
                continue
            for position, row in enumerate(rows):
                self._index.setdefault(row, (shard, position))

    def __len__(self) -> int:
        return len(self._index)

    def missing(self, rows: Iterable[int]) -> list[int]:
        """The rows of ``rows`` that no shard holds yet, in order."""
        return [r for r in rows if r not in self._index]

    def get(self, row: int) -> TopK:
        """The stored top-k targets of dataset row ``row``: ``[n, k]`` ids and log-probs, ``[n]`` tail."""
        if row not in self._index:
            raise UserError(f"teacher store {self.dir} holds no targets for training row {row}; build it again "
                            "(stages with teacher_logits)")  # fmt: skip
        shard, position = self._index[row]
        f = self._handle(shard)
        offsets = f.get_slice("offsets")[position : position + 2].tolist()
        cut = slice(offsets[0], offsets[1])
        return TopK(f.get_slice("ids")[cut], f.get_slice("logprobs")[cut], f.get_slice("tail")[cut])

    def nbytes(self) -> int:
        """Bytes on disk of the readable shards."""
        return sum(p.stat().st_size for p in {s for s, _ in self._index.values()})

    def positions(self) -> int:
        """Target positions stored in the readable shards."""
        shards = {s for s, _ in self._index.values()}
        return sum(int(self._handle(s).get_slice("offsets")[-1:].tolist()[0]) for s in shards)

    # ------------------------------------------------------------------------------------------ writing

    def write(self, rows: list[int], targets: list[TopK]) -> Path:
        """Write one shard of whole rows (atomically: a temporary file renamed into place) and index it."""
        counts = [t.shape[0] for t in targets]
        tensors = {
            "rows": torch.tensor(rows, dtype=torch.int64),
            "offsets": torch.tensor([0, *counts], dtype=torch.int64).cumsum(0),
            "ids": torch.cat([t.ids for t in targets]).to(torch.int32).contiguous(),
            "logprobs": torch.cat([t.logprobs for t in targets]).to(torch.float16).contiguous(),
            "tail": torch.cat([t.tail for t in targets]).float().contiguous(),
        }
        if tensors["ids"].shape[1:] != (self.k,) and tensors["ids"].numel():
            raise ValueError(f"targets have k={tensors['ids'].shape[1]}, the store k={self.k}")
        number = len(list(self.dir.glob(f"shard-{self.writer}-*.safetensors*")))
        path = self.dir / f"shard-{self.writer}-{number:05d}.safetensors"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        for position, row in enumerate(rows):
            self._index.setdefault(row, (path, position))
        return path

    # ------------------------------------------------------------------------------------------ helpers

    def _check_provenance(self, explicit: bool) -> None:
        meta = self.dir / "provenance.json"
        if explicit and not meta.is_file():
            raise UserError(f"teacher_store.path={self.dir} is not a teacher store (no provenance.json)")
        if meta.is_file():
            try:
                stored = json.loads(meta.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise UserError(f"teacher store {meta} is corrupt (not JSON); move the store away to rebuild") from None
            differ = sorted(k for k in set(stored) | set(self.provenance) if stored.get(k) != self.provenance.get(k))
            if differ:
                raise UserError(f"teacher store {self.dir} was built for another {', '.join(differ)} than this run "
                                f"needs ({meta}); point teacher_store elsewhere or move it away")  # fmt: skip
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = meta.with_name(f".provenance.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.provenance, indent=2, sort_keys=True))
        os.replace(tmp, meta)

    def _rows_of(self, shard: Path) -> list[int]:
        f = safe_open(str(shard), framework="pt")
        if (f.metadata() or {}).get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} shard")
        rows, offsets = f.get_tensor("rows"), f.get_tensor("offsets")
        ids, values, tail = (f.get_slice(name).get_shape() for name in ("ids", "logprobs", "tail"))
        n = int(offsets[-1])
        if len(offsets) != len(rows) + 1 or ids != [n, self.k] or values != [n, self.k] or tail != [n]:
            raise ValueError(f"shapes do not match (rows {len(rows)}, positions {n}, ids {ids}, k {self.k})")
        self._handles[shard] = f
        return rows.tolist()

    def _handle(self, shard: Path) -> Any:
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(shard), framework="pt")
        return self._handles[shard]

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers open their own handles
        return {**self.__dict__, "_handles": {}}


# ---------------------------------------------------------------------------------------------- building


def rows_for_steps(n: int, seed: int, rows_per_step: int, max_steps: int, world: int = 1) -> list[int]:
    """The dataset rows a run of ``max_steps`` optimizer steps trains on (``data.ResumableSampler``'s order: the
    first epoch's permutation, or every row once the steps run past one epoch; -1 steps: every row)."""
    per_epoch = (n // world) * world
    wanted = max_steps * rows_per_step
    if max_steps < 0 or wanted >= per_epoch:
        return list(range(n))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[:wanted])


class LocalTeacher:
    """Top-k targets from a teacher model in this process: one forward pass per batch of rows."""

    def __init__(
        self, model: torch.nn.Module, k: int, pad_id: int, temperature: float = 1.0, vocab_size: int | None = None
    ) -> None:
        self.model, self.k, self.pad_id, self.temperature, self.vocab_size = model, k, pad_id, temperature, vocab_size

    @torch.no_grad()
    def __call__(self, rows: list[dict[str, Any]]) -> list[TopK]:
        from distillprune.data import collate
        from distillprune.losses import IGNORE_INDEX

        device = next(self.model.parameters()).device
        self.model.eval()
        batch = collate(rows, self.pad_id)
        logits = self.model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits[:, :-1]  # [B, T-1, V]
        keep = batch["labels"][:, 1:].to(device) != IGNORE_INDEX  # [B, T-1]
        out = []
        for b in range(len(rows)):
            sel = logits[b][keep[b]]  # [n, V]
            sel = sel[:, : self.vocab_size] if self.vocab_size is not None else sel
            out.append(top_k(sel, self.k, self.temperature).to("cpu"))
        return out


def build(
    store: LogitStore,
    source: Callable[[list[dict[str, Any]]], list[TopK]],
    dataset: Any,
    rows: list[int],
    batch_size: int = 8,
    shard_rows: int = 256,
) -> dict[str, float]:
    """Write the top-k targets of the dataset rows that ``store`` is missing (this rank's share of them), from
    ``source`` (a ``LocalTeacher`` or ``served.ServedTeacher``: rows in, one ``TopK`` per row out),
    ``shard_rows`` rows per shard; returns rows written and seconds."""
    import time

    from distillprune.ranks import shard

    start = time.perf_counter()
    todo = shard(store.missing(rows))
    pending_rows: list[int] = []
    pending: list[TopK] = []
    for i in range(0, len(todo), batch_size):
        chunk = todo[i : i + batch_size]
        pending += source([dataset[r] for r in chunk])
        pending_rows += chunk
        last = i + batch_size >= len(todo)
        while pending_rows and (len(pending_rows) >= shard_rows or last):  # whole shards of shard_rows rows
            store.write(pending_rows[:shard_rows], pending[:shard_rows])
            pending_rows, pending = pending_rows[shard_rows:], pending[shard_rows:]
        log.info("teacher store: %d of %d rows done (%s)", i + len(chunk), len(todo), store.dir)
    return {"rows_built": len(todo), "build_s": round(time.perf_counter() - start, 1)}


class WithTargets(torch.utils.data.Dataset):
    """A training dataset whose rows carry their stored teacher targets (``teacher_topk_*``) along, for
    ``collate`` to concatenate in the order the loss selects target positions."""

    def __init__(self, ds: Any, store: LogitStore) -> None:
        self.ds, self.store = ds, store

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: Any) -> dict[str, Any]:
        index = key[0] if isinstance(key, tuple) else key
        from distillprune.data import target_count

        row = self.ds[key]
        targets = self.store.get(int(index))
        if targets.shape[0] != target_count(row):
            raise UserError(f"teacher store {self.store.dir}: row {index} has {targets.shape[0]} stored targets, the "
                            f"data {target_count(row)}; the store was built from other data")  # fmt: skip
        return {**row, "teacher_topk_ids": targets.ids, "teacher_topk_logprobs": targets.logprobs,
                "teacher_topk_tail": targets.tail}  # fmt: skip
