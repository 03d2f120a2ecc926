"""Evaluation of a model on held-out data: token-weighted loss and perplexity."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

from distillprune.distill import token_nll


@torch.no_grad()
def perplexity(model: PreTrainedModel, loader: DataLoader) -> dict[str, float]:
    """Mean next-token loss over every target token of ``loader`` and its exponent, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = torch.zeros((), dtype=torch.float64), 0
    for batch in loader:
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits  # [B, T, V]
        nll, n = token_nll(logits, batch["labels"].to(device))
        total += nll.double().cpu()
        count += int(n)
    model.train(was_training)
    loss = total.item() / max(count, 1)
    return {"val_loss": round(loss, 4), "val_ppl": round(math.exp(min(loss, 50.0)), 2), "tokens": count}
