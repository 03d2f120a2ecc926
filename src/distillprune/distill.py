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
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities.enums import GradClipAlgorithmType
from torch import Tensor
from transformers import PreTrainedModel

from distillprune.data import collate
from distillprune.errors import UserError
from distillprune.generate import generate, stop_ids
from distillprune.hardware import cpu_has_fast_bf16
from distillprune.logit_store import TopK
from distillprune.losses import IGNORE_INDEX, Divergence
from distillprune.objective import Objective, shifted, token_nll
from distillprune.sharded import fill_shards
from distillprune.strategies import adamw, fsdp2_policy, shard_fsdp2


def frozen(model: PreTrainedModel) -> PreTrainedModel:
    """Eval mode without gradients: how a teacher or a reference model is held."""
    return model.eval().requires_grad_(False)


def _cpu_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A frozen model moved to the CPU, in float32 unless the CPU runs bfloat16 fast (a GPU's bf16 teacher)."""
    model = model.cpu()
    return model if cpu_has_fast_bf16() else model.float()


def on_policy_coin(seed: int, step: int, lmbda: float) -> bool:
    """GKD's coin for one optimizer step: a function of (seed, step) only, so every rank draws the same."""
    return lmbda > 0 and random.Random(seed * 1_000_003 + step).random() < lmbda


def _scaled_logits(model: PreTrainedModel | None) -> bool:
    """Whether the model changes its logits after the lm_head (Gemma-2 soft-capping, Cohere's logit_scale)."""
    config = getattr(model, "config", None)
    return bool(getattr(config, "final_logit_softcapping", None)) or getattr(config, "logit_scale", 1.0) not in (
        None,
        1.0,
    )


class DistillSystem(L.LightningModule):
    """Teacher -> student logit distillation with AdamW, linear warmup and cosine decay.

    Args:
        student: the model being trained.
        teacher: a frozen model with the same vocabulary, or None: CE-only training, or KD from the teacher's
            stored top-k targets that the batches carry (``teacher_topk_*``, from ``logit_store``).
        loss: the divergence between the two (``distillprune.losses``); unused when ``kd_weight`` is 0.
        kd_weight: weight of the KD term; CE gets 1 - kd_weight.
        lr, weight_decay, betas: AdamW settings (no decay on norms and biases).
        warmup_steps: linear warmup from 0 to ``lr``.
        min_lr_ratio: cosine floor as a fraction of ``lr``, reached at the trainer's ``max_steps``.
        lmbda: on-policy share (GKD): with this probability a batch's responses are replaced by the student's
            own samples (``max_new_tokens`` at ``sample_temperature``) and the loss is the KD term alone on them.
            The coin depends only on (seed, step), so every rank draws the same. Needs prompt/response data.
        teacher_on_cpu: keep the teacher in CPU memory outside the strategy (each rank runs it there) instead of
            on the device; by default it follows the strategy: replicated under DDP and ZeRO 1/2, sharded for
            inference (no gradients, no optimizer state) under ZeRO-3 and FSDP.
        loss_impl, chunk_size: how CE + KD is computed (``distillprune.objective``): dense, chunked or
            fused_linear (the runner resolves the recipes' ``auto``), and the rows per chunk (0: automatic).
        vocab_size: the vocabulary the KD term compares, when the two heads differ only by padding rows.
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
        teacher_on_cpu: bool = False,
        loss_impl: str = "dense",
        chunk_size: int = 0,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= kd_weight <= 1.0:
            raise ValueError(f"kd_weight must be in [0, 1], got {kd_weight}")
        if (kd_weight > 0 or lmbda > 0) and loss is None:
            raise ValueError("kd_weight > 0 or lmbda > 0 needs a loss")
        if lmbda > 0 and teacher is None:
            raise ValueError("lmbda > 0 (on-policy samples) needs a teacher model to score them")
        if not 0.0 <= lmbda <= 1.0:
            raise ValueError(f"lmbda must be in [0, 1], got {lmbda}")
        self.student = student
        self.teacher = frozen(teacher) if teacher is not None and not teacher_on_cpu else None
        # a list hides a CPU teacher from the module tree, so no strategy moves, wraps or shards it
        self._cpu_teacher = [_cpu_copy(frozen(teacher))] if teacher is not None and teacher_on_cpu else []
        self.objective = Objective(loss, loss_impl, chunk_size, vocab_size)  # the divergence is None for CE-only
        if loss_impl == "fused_linear" and any(_scaled_logits(m) for m in (student, teacher)):
            raise ValueError(
                "system.loss_impl=fused_linear computes logits as hidden states @ lm_head and would skip this "
                "model's logit soft-capping / logit_scale; use system.loss_impl=chunked"
            )
        self.kd_weight = kd_weight
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        self.lmbda, self.seed = lmbda, seed
        self.max_new_tokens, self.sample_temperature = max_new_tokens, sample_temperature
        self.strict_loading = False  # checkpoints hold the student only; the teacher comes from its source
        self._val_nll: list[Tensor] = []
        self._val_tokens: list[Tensor] = []
        self._t0 = 0.0
        self._fsdp_done = False
        self.tokens_seen = 0  # non-padding tokens trained on by this process

    # ------------------------------------------------------------------------------------------ steps

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, parts = self._shared_step(batch)
        bs = batch["input_ids"].shape[0]
        # means over all ranks: the loss of the global batch, comparable across world sizes
        self.log("train/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=bs, sync_dist=True)
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
        # already gathered: every rank logs the same values (sync_dist only keeps Lightning from warning)
        self.log_dict({"val/loss": val_loss, "val/ppl": math.exp(min(val_loss, 50.0))}, sync_dist=True)

    def configure_model(self) -> None:
        """FSDP2 (``trainer.strategy=fsdp``): shard the student and the frozen teacher per decoder layer (and read
        the shards of a model built on the meta device, ``distillprune.sharded``). Under other strategies the
        models are used as passed in (DeepSpeed partitions them in ``initialize``, unless they were loaded so)."""
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None or self._fsdp_done:
            return
        policy = fsdp2_policy(str(self.trainer.precision))
        for model in (self.student, self.teacher):
            if model is not None:
                shard_fsdp2(model, mesh["data_parallel"], mp_policy=policy)
                fill_shards(model, self.trainer.strategy.root_device)  # a model built on the meta device
        self._fsdp_done = True

    def configure_optimizers(self) -> dict:
        decay, no_decay = [], []
        for name, p in self.student.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]  # DeepSpeed drops empty groups (LoRA has no norms to train)
        optimizer = adamw(self.trainer.strategy, self.trainer.precision_plugin)(groups, lr=self.lr, betas=self.betas)
        # max_steps -1 (train by epochs): the trainer's estimate of the optimizer steps the epochs take
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        total = max(int(total), 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self._lr_factor(step, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:  # fmt: skip
        """Clip as Lightning does, except under bf16 autocast with a fused optimizer: Lightning's mixed-precision
        plugin refuses any fused optimizer there because fp16 loss scaling would need unscaling first, but bf16
        has no loss scale, so the plain norm clipping of the gradients is exact."""
        plugin = self.trainer.precision_plugin
        if gradient_clip_val and isinstance(plugin, MixedPrecision) and plugin.scaler is None:
            algorithm = GradClipAlgorithmType(gradient_clip_algorithm or "norm")
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}

    # ------------------------------------------------------------------------------------------ helpers

    def _shared_step(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        on_policy = on_policy_coin(self.seed, self.global_step, self.lmbda)
        if on_policy:
            batch = self._student_samples(batch)
        kd_weight = 1.0 if on_policy else self.kd_weight  # the student's own samples are no ground truth (GKD)
        stored = kd_weight > 0 and "teacher_topk_ids" in batch  # the teacher's targets came with the batch
        teacher = self._teacher() if kd_weight > 0 and not stored else None
        fused = self.objective.impl == "fused_linear"
        student_out, labels = shifted(self._run(self.student, batch, "", fused), batch["labels"])  # [B, T-1, V|H]
        keep = labels != IGNORE_INDEX
        s_sel, targets = student_out[keep], labels[keep]  # [N, V|H], [N]
        t_sel = None
        if stored:
            t_sel = TopK(*(batch[f"teacher_topk_{k}"] for k in ("ids", "logprobs", "tail"))).to(s_sel.device)
            if s_sel.shape[0] != t_sel.shape[0]:
                raise ValueError(f"student has {s_sel.shape[0]} target positions, the stored teacher {t_sel.shape[0]}")
        elif teacher is not None:
            view = "teacher_" if "teacher_input_ids" in batch else ""  # in-context KD: the teacher sees more
            with torch.no_grad():
                t_out, t_labels = shifted(self._run(teacher, batch, view, fused), batch[view + "labels"])
            # the same target tokens, in order, at possibly different offsets in the two views
            t_sel = t_out[t_labels != IGNORE_INDEX].to(s_sel.device)
            if s_sel.shape[0] != t_sel.shape[0]:
                raise ValueError(f"student has {s_sel.shape[0]} target positions, teacher {t_sel.shape[0]}")
        if fused:
            heads = [m.get_output_embeddings().weight if m is not None else None for m in (self.student, teacher)]
            if heads[1] is not None:
                heads[1] = heads[1].to(s_sel.device)
            total, ce, kd = self.objective.fused_linear(s_sel, heads[0], t_sel, heads[1], targets, kd_weight)
        else:
            total, ce, kd = self.objective(s_sel, t_sel, targets, kd_weight)
        parts = {"ce": ce} | ({"kd": kd} if t_sel is not None else {})
        if self.lmbda > 0:
            parts["on_policy"] = torch.tensor(float(on_policy))
        return total * self._token_share(targets.shape[0], batch, on_policy), parts

    def _token_share(self, n: int, batch: dict[str, Tensor], on_policy: bool) -> float:
        """Scale this micro-batch's mean so that the optimizer step trains on the mean over every target token of
        the step, on all ranks and all accumulated micro-batches (HF's ``num_items_in_batch``): its ``n`` targets
        out of the step's total, times the micro-batches that Lightning and the strategy average over. With even
        counts the factor is exactly 1. On-policy samples are new tokens: their total is summed over the ranks."""
        if self._trainer is None:  # outside a Trainer (tests, tools): the micro-batch is the step
            return 1.0
        world, accumulate = self.trainer.world_size, self.trainer.accumulate_grad_batches
        if on_policy:
            counts = torch.tensor(float(n), device=self.device)
            total = self.trainer.strategy.reduce(counts, reduce_op="sum") if world > 1 else counts
            return n * world / max(float(total), 1.0)
        if "step_tokens" not in batch:
            return 1.0
        return n * world * accumulate / max(float(batch["step_tokens"][0]), 1.0)

    def _teacher(self) -> PreTrainedModel:
        if self.teacher is None and not self._cpu_teacher:
            raise ValueError("kd_weight > 0 without a teacher model needs stored teacher targets in every batch")
        return self.teacher if self.teacher is not None else self._cpu_teacher[0]

    @staticmethod
    def _run(model: PreTrainedModel, batch: dict[str, Tensor], view: str, hidden: bool) -> Tensor:
        """Logits ``[B, T, V]``, or the last hidden states ``[B, T, H]`` for the fused-linear loss."""
        device = next(model.parameters()).device
        ids, mask = batch[view + "input_ids"].to(device), batch[view + "attention_mask"].to(device)
        if hidden:
            return model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        return model(input_ids=ids, attention_mask=mask).logits

    def _student_samples(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch's prompts with responses sampled from the student, as student (and teacher) views."""
        if "prompt_len" not in batch:
            raise UserError("system.lmbda > 0 needs prompt/response data (e.g. distillprune.data.ChatDataModule)")
        stops = stop_ids(self.student)
        pad = self.student.generation_config.pad_token_id
        pad = pad if pad is not None else stops[0]
        views = [""] + (["teacher_"] if "teacher_input_ids" in batch else [])
        prompts = {v: _prompts(batch, v) for v in views}
        responses = generate(
            self.student,
            prompts[""],
            pad,
            stops,
            max_new_tokens=self.max_new_tokens,
            do_sample=True,
            temperature=self.sample_temperature,
            # with several ranks every one runs the same number of forward passes: under ZeRO-3 and FSDP each
            # is a collective (parameters are gathered), and a rank that stopped early would leave the rest hanging
            synced_gpus=self._trainer is not None and self.trainer.world_size > 1,
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
