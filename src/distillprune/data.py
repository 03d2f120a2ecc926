"""Data: Lightning DataModules over Hugging Face ``datasets`` that yield dict batches.

``TextDataModule`` packs plain text into fixed-length blocks (and prompt/response rows through the chat
template, prompt masked); ``ChatDataModule`` applies the chat template to instruction/chat rows and masks the
prompt out of the loss. The sources, and mixtures of them, are ``distillprune.sources``; ``mix`` samples a
mixture's parts by their shares of the target tokens. The validation split holds out whole documents, chosen by
a hash of their ids, so no block of a held-out text is ever trained on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from datasets import Dataset
from torch.utils.data import DataLoader, Sampler
from transformers import PreTrainedTokenizerBase

from distillprune.errors import UserError
from distillprune.losses import IGNORE_INDEX
from distillprune.ranks import barrier, rank_and_world
from distillprune.sources import (  # noqa: F401 - the sources are part of this module's interface
    MIXTURES,
    Document,
    document_text,
    jsonl_rows,
    load_documents,
    mixture_parts,
    split_documents,
    where,
)

# ----------------------------------------------------------------------------------------------- splits


def write_splits(folder: Path, splits: dict[str, list[dict]]) -> dict[str, Path]:
    """Write each non-empty split as ``folder/<name>.jsonl`` (atomically); returns the paths written. Every rank
    calls it with the same rows: rank 0 writes, the others wait for the files (one writer, so no rank replaces a
    file that another is writing or reading)."""
    paths = {name: folder / f"{name}.jsonl" for name, rows in splits.items() if rows}
    if rank_and_world()[0] == 0:
        folder.mkdir(parents=True, exist_ok=True)
        for name, path in paths.items():
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in splits[name]))
            os.replace(tmp, path)
    barrier("the training files")
    return paths


# ----------------------------------------------------------------------------------------------- encoding


def leading_bos(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS id when the tokenizer starts every encoding with it (Gemma, Llama 3: models that saw BOS first
    in every pre-training sequence, and score far worse without it), else None (SmolLM2)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def pack(texts: list[str], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> Dataset:
    """Tokenise, end every text with EOS, concatenate, and cut into blocks of ``seq_len`` (the tail is dropped);
    for a tokenizer that starts its encodings with BOS, every block is BOS + ``seq_len - 1`` tokens."""
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    bos = leading_bos(tokenizer)
    width = seq_len - (bos is not None)
    n = len(stream) // width
    blocks = torch.tensor(stream[: n * width], dtype=torch.long).view(n, width)  # [n, width]
    if bos is not None:
        blocks = torch.cat([torch.full((n, 1), bos, dtype=torch.long), blocks], dim=1)  # [n, seq_len]
    return Dataset.from_dict({"input_ids": blocks.tolist()})


def conversation(row: dict, doc_id: str) -> list[dict[str, str]]:
    """Chat messages from a row: ``messages``, or ``prompt``/``response``, or ``instruction``/``input``/``output``."""
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in msgs):
            raise UserError(f"{where(doc_id)}: 'messages' must be a list of {{role, content}} objects")
        return msgs
    if "prompt" in row and "response" in row:
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    if "instruction" in row and "output" in row:
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    raise UserError(
        f"{where(doc_id)}: expected 'messages', 'prompt'+'response' or 'instruction'+'output' (got {', '.join(row)})"
    )


def encode_chat(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, seq_len: int, last_turn_only: bool = False
) -> dict[str, list]:
    """Token ids and labels for one conversation: only assistant turns count (with ``last_turn_only``, only the
    last one, e.g. after few-shot demonstrations), everything else is -100."""
    input_ids: list[int] = []
    labels: list[int] = []
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = chat_ids(tokenizer, messages[:i], add_generation_prompt=True)
        full = chat_ids(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if full[: len(prompt)] != prompt or prompt[: len(input_ids)] != input_ids:
            raise UserError("the chat template does not render conversations as growing prefixes")
        answer = full[len(prompt) :] if i == last or not last_turn_only else [IGNORE_INDEX] * (len(full) - len(prompt))
        labels += [IGNORE_INDEX] * (len(prompt) - len(input_ids)) + answer
        input_ids = full
    first_target = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    return {"input_ids": input_ids[:seq_len], "labels": labels[:seq_len], "prompt_len": min(first_target, seq_len)}


def chat_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """The chat template's token ids for ``messages`` (opening the assistant's turn when asked)."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def collate(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows into a batch; rows without ``labels`` train on every token. Rows that carry a separate
    teacher view (``teacher_input_ids``/``teacher_labels``, for in-context distillation) get it padded alike,
    ``step_tokens`` (the optimizer step's target count, from the sampler) and ``prompt_len`` /
    ``teacher_prompt_len`` (tokens before the first target) come along for the loss and for on-policy
    sampling."""
    batch = _pad([r["input_ids"] for r in rows], [r.get("labels", r["input_ids"]) for r in rows], pad_id, "")
    if "teacher_input_ids" in rows[0]:
        teacher = [r["teacher_input_ids"] for r in rows]
        batch |= _pad(teacher, [r["teacher_labels"] for r in rows], pad_id, "teacher_")
    for key in ("prompt_len", "teacher_prompt_len", "step_tokens"):
        if key in rows[0]:
            batch[key] = torch.tensor([r[key] for r in rows])  # [B]
    for key in ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_topk_tail"):  # stored teacher targets
        if key in rows[0]:
            batch[key] = torch.cat([r[key] for r in rows])  # [N, k] | [N]: the rows' target positions in order
    return batch


def _pad(ids: list[list[int]], labels: list[list[int]], pad_id: int, prefix: str) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in ids)
    out = {
        "input_ids": torch.full((len(ids), width), pad_id, dtype=torch.long),  # [B, T]
        "attention_mask": torch.zeros((len(ids), width), dtype=torch.long),  # [B, T]
        "labels": torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long),  # [B, T]
    }
    for i, (row, lab) in enumerate(zip(ids, labels, strict=True)):
        out["input_ids"][i, : len(row)] = torch.tensor(row)
        out["attention_mask"][i, : len(row)] = 1
        out["labels"][i, : len(lab)] = torch.tensor(lab)
    return {prefix + k: v for k, v in out.items()}


# ----------------------------------------------------------------------------------------------- loading


class ResumableSampler(Sampler[int]):
    """A shuffled order per (seed, epoch) that can start part-way through an epoch, so a resumed run sees
    exactly the batches an uninterrupted run would have seen. With ``world`` ranks, rank r takes every world-th
    index from r on (the tail that does not fill a round is dropped), so the ranks' batches together are the
    batch of ``world`` times the size that one process would take: the same global batch at any world size.

    Given each sample's number of target tokens (``targets``), it yields ``(index, step_tokens)`` instead: the
    targets of every sample that the same optimizer step trains on, over all ranks and all ``accumulate``
    micro-batches of ``batch_size``, so that a step's loss can be its mean over all of them."""

    def __init__(
        self,
        n: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        targets: list[int] | None = None,
        batch_size: int = 1,
        accumulate: int = 1,
    ) -> None:
        self.n, self.seed, self.epoch, self.skip = n, seed, 0, 0
        self.rank, self.world = rank, world
        self.targets, self.per_step = targets, batch_size * world * accumulate

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        usable = order[: len(self) * self.world]
        skip, self.skip = self.skip, 0
        if self.targets is None:
            return iter(usable[self.rank :: self.world][skip:])
        # rank r's j-th sample sits at position r + j·world of ``usable``; a step covers per_step positions
        steps = [
            sum(self.targets[i] for i in usable[s : s + self.per_step]) for s in range(0, len(usable), self.per_step)
        ]
        mine = [(usable[p], steps[p // self.per_step]) for p in range(self.rank, len(usable), self.world)]
        return iter(mine[skip:])

    def __len__(self) -> int:
        return self.n // self.world


class BlocksDataModule(L.LightningDataModule):
    """Shared loading: documents -> split -> encoded train/val datasets -> resumable loaders."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        source: str,
        seq_len: int = 256,
        batch_size: int = 4,
        val_fraction: float = 0.05,
        val_batches: int | None = 16,
        val_source: str | None = None,
        text_field: str = "text",
        seed: int = 1234,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.tokenizer, self.source, self.seq_len, self.batch_size = tokenizer, source, seq_len, batch_size
        self.val_fraction, self.val_batches, self.text_field = val_fraction, val_batches, text_field
        self.val_source = val_source
        self.seed, self.num_workers = seed, num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._resume: dict[str, int] = {}
        self.mixture: dict[str, dict[str, float]] = {}  # per source of a mixture: rows, target tokens, share
        self.teacher_store: Any = None  # a logit_store.LogitStore: training rows carry their stored teacher targets

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        parts = mixture_parts(self.source)
        trains, vals = [], []
        for source, _ in parts:
            docs = load_documents(source, self.text_field)
            if self.val_source is None:
                train_docs, val_docs = split_documents(docs, self.val_fraction, self.seed)
                vals.append(self._encoded(val_docs, source, "validation"))
            else:  # a separate validation source: train on all of ``source``
                train_docs = docs
            trains.append(self._encoded(train_docs, source, "train"))
        if self.val_source is not None:
            vals = [self._encoded(load_documents(self.val_source, self.text_field), self.val_source, "validation")]
        shares = [share for _, share in parts]
        self.train_set, self.mixture = mix(trains, shares, self.seed, [name for name, _ in parts])
        self.val_set, _ = mix(vals, shares if len(vals) == len(parts) else [1.0], self.seed)
        if self.val_batches:
            self.val_set = self.val_set.select(range(min(len(self.val_set), self.val_batches * self.batch_size)))

    def _encoded(self, docs: list[Document], source: str, split: str) -> Dataset:
        ds = self.encode(docs)
        if len(ds) == 0:
            raise UserError(
                f"data '{source}': the {split} split is empty after encoding (seq_len "
                f"{self.seq_len}); use more text or a shorter seq_len"
            )
        return ds

    def encode(self, docs: list[Document]) -> Dataset:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer  # None when used outside a Trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        targets = [target_count(row) for row in self.train_set.with_format(None)]
        sampler = ResumableSampler(len(self.train_set), self.seed, rank, world, targets, self.batch_size, accumulate)
        if len(sampler) == 0:
            raise UserError(f"{len(self.train_set)} training blocks cannot be shared among {world} ranks")
        if self._resume:
            sampler.set_epoch(self._resume["epoch"])
            sampler.skip = self._resume["batches"] * self.batch_size
            self._resume = {}
        return self._loader(self.train_set, sampler)

    def val_dataloader(self) -> DataLoader:
        # every rank scores the whole validation set: ZeRO-3 and FSDP need the same forward passes on all ranks,
        # and summing tokens and NLL over ranks keeps the exact per-token mean
        return self._loader(self.val_set, None)

    def state_dict(self) -> dict[str, int]:
        # saved with every checkpoint: where in which epoch the run was, so a resume skips what was seen
        batches = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": self.trainer.current_epoch, "batches": batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = dict(state)

    def _loader(self, ds: Dataset, sampler: Sampler | None) -> DataLoader:
        pad = self.tokenizer.pad_token_id
        rows = _StepTokens(ds.with_format(None)) if sampler is not None else ds.with_format(None)
        if sampler is not None and self.teacher_store is not None:
            from distillprune.logit_store import WithTargets

            rows = WithTargets(rows, self.teacher_store)
        return DataLoader(
            rows,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=False,
            num_workers=self.num_workers,
            collate_fn=lambda rows: collate(rows, pad),
        )


def target_count(row: dict[str, Any]) -> int:
    """Next-token targets of one row: the positions after the first whose label counts."""
    labels = row.get("labels", row["input_ids"])
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


class _StepTokens(torch.utils.data.Dataset):
    """Rows looked up by ``(index, step_tokens)`` keys, carrying their optimizer step's target count along."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, step_tokens = key
        return {**self.ds[index], "step_tokens": step_tokens}


class TextDataModule(BlocksDataModule):
    """Plain text packed into ``seq_len``-token blocks, every token a target; rows of prompt/response or chat
    data without a text field (``packaged_chat``, say, in a mixture) through the chat template, prompt masked."""

    def encode(self, docs: list[Document]) -> Dataset:
        if docs and _is_chat(docs[0], self.text_field):
            return encode_rows(docs, self.tokenizer, self.seq_len)
        return pack([document_text(d, self.text_field) for d in docs], self.tokenizer, self.seq_len)


class ChatDataModule(BlocksDataModule):
    """Instruction/chat rows through the tokenizer's chat template; only assistant tokens are targets."""

    def encode(self, docs: list[Document]) -> Dataset:
        return encode_rows(docs, self.tokenizer, self.seq_len)


def encode_rows(docs: list[Document], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> Dataset:
    """Chat rows through the tokenizer's chat template, one row each (``encode_chat``); rows left with nothing to
    learn after truncation are dropped."""
    if not tokenizer.chat_template:
        raise UserError("chat data needs a tokenizer with a chat template")
    rows = []
    for doc_id, row in docs:
        if isinstance(row, str):
            raise UserError(f"{where(doc_id)}: chat data must be .jsonl/.parquet rows, not plain text")
        encoded = encode_chat(conversation(row, doc_id), tokenizer, seq_len)
        if any(label != IGNORE_INDEX for label in encoded["labels"][1:]):  # something left to learn
            rows.append(encoded)
    return Dataset.from_list(rows) if rows else Dataset.from_dict({"input_ids": [], "labels": []})


def _is_chat(doc: Document, text_field: str) -> bool:
    row = doc[1]
    return isinstance(row, dict) and text_field not in row and bool({"messages", "prompt", "instruction"} & set(row))


def mix(
    parts: list[Dataset], shares: list[float], seed: int, names: list[str] | None = None
) -> tuple[Dataset, dict[str, dict[str, float]]]:
    """Rows of each part in proportion to its share of the target tokens, as many as the scarcest part allows
    (no row twice), shuffled together as ``input_ids`` + ``labels`` rows; and, per part name, its rows, target
    tokens and measured share. One part is returned as it is."""
    names = names or [str(i) for i in range(len(parts))]
    if len(parts) == 1:
        return parts[0], {names[0]: {"rows": len(parts[0]), "share": 1.0}}
    targets = [[target_count(row) for row in ds.with_format(None)] for ds in parts]
    budget = min(sum(t) / share for t, share in zip(targets, shares, strict=True))  # total target tokens
    rng = torch.Generator().manual_seed(seed)
    rows, report = [], {}
    for name, ds, t, share in zip(names, parts, targets, shares, strict=True):
        order, taken, total = torch.randperm(len(ds), generator=rng).tolist(), [], 0
        for i in order:
            if total + t[i] / 2 > share * budget:  # the next row would overshoot more than it falls short
                break
            taken.append(i)
            total += t[i]
        for row in ds.select(taken).with_format(None):
            rows.append({"input_ids": row["input_ids"], "labels": row.get("labels", row["input_ids"])})
        report[name] = {"rows": len(taken), "target_tokens": total}
    spent = sum(r["target_tokens"] for r in report.values())
    for r in report.values():
        r["share"] = round(r["target_tokens"] / spent, 4)
    order = torch.randperm(len(rows), generator=rng).tolist()
    return Dataset.from_list([rows[i] for i in order]), report


def calibration_ids(
    tokenizer: PreTrainedTokenizerBase, source: str, samples: int, seq_len: int, seed: int
) -> torch.Tensor:
    """``samples`` packed windows of ``seq_len`` tokens, drawn (seeded) from the training split of ``source`` (a
    mixture too): the calibration data of pruning and of GPTQ / AWQ; ``[n, seq_len]`` with n <= samples."""
    dm = TextDataModule(tokenizer, source, seq_len=seq_len, batch_size=1, val_batches=None, seed=seed)
    dm.setup()
    stream: list[int] = []  # a single source's packed blocks are the windows; a mixture's rows are cut into them
    for row in dm.train_set.shuffle(seed=seed).with_format(None):
        stream.extend(row["input_ids"])
        if len(stream) >= samples * seq_len:
            break
    n = min(samples, len(stream) // seq_len)
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)  # [n, seq_len]
