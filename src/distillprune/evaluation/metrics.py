"""Evaluation of a model on held-out data: token-weighted loss and perplexity (over blocks, or one stream in
strided windows), parameter and FLOP counts, agreement scores."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

from distillprune.errors import UserError
from distillprune.losses import IGNORE_INDEX
from distillprune.models import eval_mode
from distillprune.objective import token_nll


@torch.no_grad()
def perplexity(model: PreTrainedModel, loader: DataLoader) -> dict[str, float]:
    """Mean next-token loss over every target token of ``loader`` and its exponent, in eval mode."""
    with eval_mode(model):
        device = next(model.parameters()).device
        total, count = torch.zeros((), dtype=torch.float64), 0
        for batch in loader:
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits  # [B, T, V]
            nll, n = token_nll(logits, batch["labels"].to(device))
            total += nll.double().cpu()
            count += int(n)
    loss = total.item() / max(count, 1)
    return {"val_loss": round(loss, 4), "val_ppl": round(math.exp(min(loss, 50.0)), 2), "tokens": count}


@torch.no_grad()
def strided_perplexity(
    model: PreTrainedModel, ids: torch.Tensor, context: int, stride: int, bos: int | None = None
) -> dict[str, float]:
    """Perplexity of one long token stream scored by ``model`` in windows of ``context`` tokens moved by
    ``stride`` (``windowed_perplexity``); with ``bos`` (``data.leading_bos``), the model sees it before every
    window, as it saw it before every pre-training sequence (the same tokens are scored)."""

    def logits_of(window: torch.Tensor) -> torch.Tensor:  # [1, W] -> [1, W, V]
        if bos is None:
            return model(input_ids=window.to(device)).logits
        first = torch.full((window.shape[0], 1), bos, dtype=window.dtype)
        return model(input_ids=torch.cat([first, window], dim=1).to(device)).logits[:, 1:]

    with eval_mode(model):
        device = next(model.parameters()).device
        return windowed_perplexity(logits_of, ids, context, stride)


def windowed_perplexity(
    logits_of: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, context: int, stride: int
) -> dict[str, float]:
    """Perplexity of one long token stream scored in windows of ``context`` tokens moved by ``stride``;
    ``logits_of`` maps a window [1, W] to its logits [1, W, V] (a Hugging Face model, or llama.cpp).

    Each token is scored once: the first window scores all of its tokens, each later window only its last
    ``stride`` (each of which sees at least ``context - stride`` tokens before it). With ``stride == context``
    the windows do not overlap and the first token of each has no context, so it is not scored."""
    if not 0 < stride <= context:
        raise UserError(f"evaluate.text.stride={stride} must be in 1..context ({context})")
    if ids.numel() < 2:
        raise UserError("evaluate.text: the held-out text is shorter than 2 tokens")
    ids = ids.reshape(-1)
    total, count, start = torch.zeros((), dtype=torch.float64), 0, 0
    while True:
        end = min(start + context, ids.numel())
        window = ids[start:end].unsqueeze(0)  # [1, W]
        labels = window.clone()
        if start > 0:
            labels[:, : context - stride] = IGNORE_INDEX  # already scored by the window before
        logits = logits_of(window)  # [1, W, V]
        nll, n = token_nll(logits, labels.to(logits.device))
        total += nll.double().cpu()
        count += int(n)
        if end == ids.numel():
            break
        start += stride
    loss = total.item() / max(count, 1)
    return {"loss": round(loss, 4), "ppl": round(math.exp(min(loss, 50.0)), 3), "tokens": count}


def count_params(model: torch.nn.Module) -> int:
    """Parameters of a model, a tied embedding counted once; whole sizes of ZeRO-3 partitions and meta tensors."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def flops_per_token(model: PreTrainedModel, context: int) -> int:
    """Forward FLOPs per token: 2 per weight of every linear map (the tied head included, the embedding lookup
    not), plus the attention scores and weighted sum at the mean position of a ``context``-token window."""
    linear = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            linear += module.in_features * module.out_features
    query_width = sum(  # o_proj's input is the query width in every family, fused q/k/v or not
        m.o_proj.in_features for m in model.modules() if hasattr(m, "o_proj") and isinstance(m.o_proj, torch.nn.Linear)
    )
    mean_keys = (context + 1) / 2  # a causal window: position t attends to t keys
    return int(2 * linear + 2 * 2 * query_width * mean_keys)


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
