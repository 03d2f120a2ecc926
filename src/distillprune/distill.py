"""The distillation system: a frozen teacher and a trainable student, passed in as plain Hugging Face models.

loss = (1 - kd_weight)·CE(student, labels) + kd_weight·KD(student, teacher) at the positions whose next token
is a target. With no teacher and kd_weight = 0 the same system is plain supervised fine-tuning (the baseline).
"""

from __future__ import annotations

import math
import time

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel

from distillprune.losses import IGNORE_INDEX, Divergence


def frozen(model: PreTrainedModel) -> PreTrainedModel:
    """Eval mode without gradients: how a teacher or a reference model is held."""
    return model.eval().requires_grad_(False)


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
    ) -> None:
        super().__init__()
        if not 0.0 <= kd_weight <= 1.0:
            raise ValueError(f"kd_weight must be in [0, 1], got {kd_weight}")
        if kd_weight > 0 and (teacher is None or loss is None):
            raise ValueError("kd_weight > 0 needs a teacher and a loss")
        self.student = student
        self.teacher = frozen(teacher) if teacher is not None else None
        self.kd_loss = loss
        self.kd_weight = kd_weight
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        self.strict_loading = False  # checkpoints hold the student only; the teacher comes from its source
        self._val_nll: list[Tensor] = []
        self._val_tokens: list[Tensor] = []
        self._t0 = 0.0

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
        tokens_per_s = batch["attention_mask"].sum().item() / max(time.perf_counter() - self._t0, 1e-9)
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
        ids, mask = batch["input_ids"], batch["attention_mask"]
        student_logits, labels = shifted(self.student(input_ids=ids, attention_mask=mask).logits, batch["labels"])
        ce = F.cross_entropy(
            student_logits.reshape(-1, student_logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX
        )  # [B, T-1, V] against [B, T-1]
        parts = {"ce": ce.detach()}
        if self.kd_weight == 0.0:
            return ce, parts
        with torch.no_grad():
            teacher_logits, _ = shifted(self.teacher(input_ids=ids, attention_mask=mask).logits, batch["labels"])
        kd = self.kd_loss(student_logits, teacher_logits, labels)
        parts["kd"] = kd.detach()
        return (1.0 - self.kd_weight) * ce + self.kd_weight * kd, parts

    def _lr_factor(self, step: int, total: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = min(1.0, (step - self.warmup_steps) / max(1, total - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
