"""Spreading a pruning ratio over layers by their sensitivity (OWL's non-uniform layer ratios, Minitron's
layer scores).

``layer_sensitivity`` prunes one layer at a time to the uniform plan's widths and measures the rise of the
calibration loss: removed heads and channels are zeroed where they enter the residual stream (their ``o_proj``
and ``down_proj`` columns), which is exactly their removal, then put back, so no copy of the model is made.
``allocate`` ranks the layers and gives the least sensitive ones the largest share of the ratio; ``surgery.plan``
turns the shares into GQA-valid widths that still remove the whole ratio, capping a share no layer can give (a
model with few pruned layers at a high ratio) and passing the rest to the other layers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from transformers import PreTrainedModel

from distillprune.errors import UserError
from distillprune.prune.groups import decoder_layers, family_of, head_dim, layer_widths, parts
from distillprune.prune.importance import LayerScores
from distillprune.prune.surgery import Plan, select

METHODS = ("uniform", "sensitivity")  # = choices.ALLOCATIONS


@torch.no_grad()
def calibration_loss(model: PreTrainedModel, batches: Iterable[dict[str, Tensor]]) -> float:
    """The mean next-token loss over every calibration token."""
    total, count = 0.0, 0
    for batch in batches:
        ids = batch["input_ids"].to(model.device)  # [B, T]
        logits = model(input_ids=ids).logits[:, :-1].float()  # [B, T-1, V]
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        total, count = total + float(nll), count + ids[:, 1:].numel()
    return total / max(count, 1)


@torch.no_grad()
def layer_sensitivity(
    model: PreTrainedModel,
    batches: list[dict[str, Tensor]],
    scores: dict[int, LayerScores],
    the_plan: Plan,
    gqa: str,
) -> dict[int, float]:
    """For each layer of ``the_plan``: the calibration loss with only that layer cut to the plan's widths (the
    structures ``select`` would keep), minus the dense loss."""
    base = calibration_loss(model, batches)
    widths, hd, adapter = layer_widths(model), head_dim(model), family_of(model)
    keep = select(scores, the_plan, widths, gqa, uniform=True)
    blocks = decoder_layers(model, adapter)
    out = {}
    for i in the_plan.layers:
        p = parts(blocks[i], adapter)
        gone_heads = sorted(set(range(widths[i].heads)) - set(keep[i]["heads"]))
        gone = {
            "o": torch.tensor([h * hd + j for h in gone_heads for j in range(hd)], dtype=torch.long),
            "down": torch.tensor(
                sorted(set(range(widths[i].intermediate)) - set(keep[i]["channels"])), dtype=torch.long
            ),
        }
        saved = {name: p[name].linear.weight[:, idx].clone() for name, idx in gone.items()}
        try:
            for name, idx in gone.items():
                p[name].linear.weight[:, idx] = 0
            out[i] = calibration_loss(model, batches) - base
        finally:
            for name, idx in gone.items():
                p[name].linear.weight[:, idx] = saved[name]
    return out


def allocate(sensitivity: dict[int, float], spread: float) -> dict[int, float]:
    """Each layer's share of the mean per-layer ratio, linear in its sensitivity rank: the most sensitive layer
    ``1 - spread``, the least ``1 + spread``; the shares average exactly 1 (ties keep the layer order)."""
    if not 0.0 <= spread < 1.0:
        raise UserError(f"prune.allocation.spread must be in [0, 1), got {spread}")
    order = sorted(sensitivity, key=lambda i: (-sensitivity[i], i))  # most sensitive first
    n = len(order)
    if n == 1:
        return {order[0]: 1.0}
    return {i: 1.0 - spread + 2.0 * spread * rank / (n - 1) for rank, i in enumerate(order)}
