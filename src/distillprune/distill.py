"""The distillation system: a frozen teacher and a trainable student, passed in as plain Hugging Face models.

loss = (1 - kd_weight)·CE(student, labels) + kd_weight·KD(student, teacher) at the positions whose next token
is a target. With no teacher and kd_weight = 0 the same system is plain supervised fine-tuning (the baseline).
"""

from __future__ import annotations

import math
import random
import time

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel

from distillprune.data import collate
from distillprune.errors import UserError
from distillprune.generate import generate
from distillprune.losses import IGNORE_INDEX, Divergence


def frozen(model: PreTrainedModel) -> PreTrainedModel:
    """Eval mode without gradients: how a teacher or a reference model is held."""
    return model.eval().requires_grad_(False)


def on_policy_coin(seed: int, step: int, lmbda: float) -> bool:
    """GKD's coin for one optimizer step: a function of (seed, step) only, so every rank draws the same."""
    return lmbda > 0 and random.Random(seed * 1_000_003 + step).random() < lmbda


def shifted(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Align position t's logits with token t+1: ``[B, T, V], [B, T] -> [B, T-1, V], [B, T-1]``."""
    return logits[:, :-1], labels[:, 1:]


def token_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed next-token negative log-likelihood and the number of target tokens (for exact perplexity)."""
    logits, labels = shifted(logits, labels)
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return nll, (labels != IGNORE_INDEX).sum()


class DistillSystem(L.LightningModule):
    """Teacher -> student logit distillation with AdamW, linear warmup and cosine decay.

    Args:
        student: the model being trained.
        teacher: a frozen model with the same vocabulary, or None for CE-only training.
        loss: the divergence between the two (``distillprune.losses``); unused when ``kd_weight`` is 0.
        kd_weight: weight of the KD term; CE gets 1 - kd_weight.
        lr, weight_decay, betas: AdamW settings (no decay on norms and biases).
        warmup_steps: linear warmup from 0 to ``lr``.
        min_lr_ratio: cosine floor as a fraction of ``lr``, reached at the trainer's ``max_steps``.
        lmbda: on-policy share (GKD): with this probability a batch's responses are replaced by the student's
            own samples (``max_new_tokens`` at ``sample_temperature``) and the loss is the KD term alone on them.
            The coin depends only on (seed, step), so every rank draws the same. Needs prompt/response data.
    """

    def __init__(
        self,
        student: PreTrainedModel,
        teacher: PreTrainedModel | None = None,
        loss: Divergence | None = None,
        kd_weight: float = 0.5,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 10,
        min_lr_ratio: float = 0.1,
        lmbda: float = 0.0,
        max_new_tokens: int = 64,
        sample_temperature: float = 1.0,
        seed: int = 1234,
    ) -> None:
        super().__init__()
        if not 0.0 <= kd_weight <= 1.0:
            raise ValueError(f"kd_weight must be in [0, 1], got {kd_weight}")
        if (kd_weight > 0 or lmbda > 0) and (teacher is None or loss is None):
            raise ValueError("kd_weight > 0 or lmbda > 0 needs a teacher and a loss")
        if not 0.0 <= lmbda <= 1.0:
            raise ValueError(f"lmbda must be in [0, 1], got {lmbda}")
        self.student = student
        self.teacher = frozen(teacher) if teacher is not None else None
        self.kd_loss = loss
        self.kd_weight = kd_weight
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        self.lmbda, self.seed = lmbda, seed
        self.max_new_tokens, self.sample_temperature = max_new_tokens, sample_temperature
        self.strict_loading = False  # checkpoints hold the student only; the teacher comes from its source
        self._val_nll: list[Tensor] = []
        self._val_tokens: list[Tensor] = []
        self._t0 = 0.0
        self.tokens_seen = 0  # non-padding tokens trained on by this process

    # ------------------------------------------------------------------------------------------ steps

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, parts = self._shared_step(batch)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=bs)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bs)
        return loss

    def on_train_batch_start(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, outputs: Tensor | dict, batch: dict[str, Tensor], batch_idx: int) -> None:
        # forward, backward and (on an accumulation boundary) the optimizer step of this micro-batch
        tokens = int(batch["attention_mask"].sum())
        self.tokens_seen += tokens
        tokens_per_s = tokens / max(time.perf_counter() - self._t0, 1e-9)
        self.log("train/tokens_per_s", tokens_per_s, batch_size=batch["input_ids"].shape[0])

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll, count = token_nll(logits, batch["labels"])
        self._val_nll.append(nll)
        self._val_tokens.append(count)

    def on_validation_epoch_end(self) -> None:
        nll = self.all_gather(torch.stack(self._val_nll).sum()).sum()
        tokens = self.all_gather(torch.stack(self._val_tokens).sum()).sum()
        self._val_nll.clear()
        self._val_tokens.clear()
        val_loss = (nll / tokens.clamp(min=1)).item()
        self.log_dict({"val/loss": val_loss, "val/ppl": math.exp(min(val_loss, 50.0))}, sync_dist=False)

    def configure_optimizers(self) -> dict:
        decay, no_decay = [], []
        for name, p in self.student.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas)
        total = max(self.trainer.max_steps, 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self._lr_factor(step, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}

    # ------------------------------------------------------------------------------------------ helpers

    def _shared_step(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        on_policy = on_policy_coin(self.seed, self.global_step, self.lmbda)
        if on_policy:
            batch = self._student_samples(batch)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        student_logits, labels = shifted(self.student(input_ids=ids, attention_mask=mask).logits, batch["labels"])
        ce = F.cross_entropy(
            student_logits.reshape(-1, student_logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX
        )  # [B, T-1, V] against [B, T-1]
        parts = {"ce": ce.detach()}
        if self.kd_weight == 0.0 and not on_policy:
            return ce, parts
        view = "teacher_" if "teacher_input_ids" in batch else ""  # in-context KD: the teacher sees more
        with torch.no_grad():
            out = self.teacher(input_ids=batch[view + "input_ids"], attention_mask=batch[view + "attention_mask"])
            teacher_logits, teacher_labels = shifted(out.logits, batch[view + "labels"])
        # the same target tokens, in order, at possibly different offsets in the two views: [N, V] each
        s_sel, t_sel = student_logits[labels != IGNORE_INDEX], teacher_logits[teacher_labels != IGNORE_INDEX]
        if s_sel.shape[0] != t_sel.shape[0]:
            raise ValueError(f"student has {s_sel.shape[0]} target positions, teacher {t_sel.shape[0]}")
        kd = self.kd_loss(s_sel, t_sel)
        parts["kd"] = kd.detach()
        if self.lmbda > 0:
            parts["on_policy"] = torch.tensor(float(on_policy))
        if on_policy:  # the student's own samples are no ground truth: divergence only (GKD)
            return kd, parts
        return (1.0 - self.kd_weight) * ce + self.kd_weight * kd, parts

    def _student_samples(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch's prompts with responses sampled from the student, as student (and teacher) views."""
        if "prompt_len" not in batch:
            raise UserError("system.lmbda > 0 needs prompt/response data (e.g. distillprune.data.ChatDataModule)")
        config = self.student.generation_config
        eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
        pad = config.pad_token_id if config.pad_token_id is not None else eos
        views = [""] + (["teacher_"] if "teacher_input_ids" in batch else [])
        prompts = {v: _prompts(batch, v) for v in views}
        responses = generate(
            self.student,
            prompts[""],
            pad,
            eos,
            max_new_tokens=self.max_new_tokens,
            do_sample=True,
            temperature=self.sample_temperature,
        )
        rows = []
        for i, response in enumerate(responses):
            row = {}
            for v in views:
                row[v + "input_ids"] = prompts[v][i] + response
                row[v + "labels"] = [IGNORE_INDEX] * len(prompts[v][i]) + response
            rows.append(row)
        new = collate(rows, pad)
        return {k: t.to(batch["input_ids"].device) for k, t in new.items()}

    def _lr_factor(self, step: int, total: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = min(1.0, (step - self.warmup_steps) / max(1, total - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _prompts(batch: dict[str, Tensor], view: str) -> list[list[int]]:
    ids, lens = batch[view + "input_ids"], batch[view + "prompt_len"]
    return [row[:n] for row, n in zip(ids.tolist(), lens.tolist(), strict=True)]
