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


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over whitespace words: the longest common subsequence against both lengths."""
    a, b = candidate.split(), reference.split()
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def token_match(candidate: list[int], reference: list[int]) -> float:
    """Share of the reference's positions where the candidate has the same token (EOS included)."""
    if not reference:
        return float(not candidate)
    return sum(1 for i, t in enumerate(reference) if i < len(candidate) and candidate[i] == t) / len(reference)
