"""Depth pruning: whole decoder layers leave, ranked by block importance on calibration data.

``cosine`` is ShortGPT's block influence, 1 - cos(input, output) of each layer averaged over the calibration
tokens (a layer that barely turns its input matters little). ``ppl`` is the calibration perplexity with the layer
left out (its output replaced by its input), as Minitron ranks depth; it costs one forward pass per layer. The
export is the family's stock config with fewer layers (per-layer lists such as Gemma 3's ``layer_types`` follow).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from distillprune.errors import UserError
from distillprune.prune.groups import decoder_layers, family_of
from distillprune.validate import removable_layers as candidates  # torch-free: validation checks it early

DEPTH_IMPORTANCE = ("cosine", "ppl")  # = choices.DEPTH_IMPORTANCE
__all__ = ["DEPTH_IMPORTANCE", "block_importance", "candidates", "choose", "remove_layers"]


@torch.no_grad()
def block_importance(model: PreTrainedModel, batches: Iterable[dict[str, Tensor]], method: str) -> Tensor:
    """One score per decoder layer, higher = more important: [n_layers]."""
    if method not in DEPTH_IMPORTANCE:
        raise UserError(f"depth.importance '{method}' is unknown; choose {', '.join(DEPTH_IMPORTANCE)}")
    blocks = decoder_layers(model, family_of(model))
    batches = list(batches)
    if not batches:
        raise UserError("no calibration samples: depth.calibration.samples must be > 0")
    if method == "cosine":
        return _block_influence(model, blocks, batches)
    base = _ppl(model, batches)
    scores = []
    for block in blocks:
        handle = block.register_forward_hook(_skip, with_kwargs=True)
        try:
            scores.append(_ppl(model, batches) - base)  # the PPL increase when this layer is left out
        finally:
            handle.remove()
    return torch.tensor(scores)


def choose(scores: Tensor, remove: int, allowed: list[int]) -> list[int]:
    """The ``remove`` least important of the ``allowed`` layers, sorted."""
    ranked = sorted(allowed, key=lambda i: float(scores[i]))
    return sorted(ranked[:remove])


def remove_layers(model: PreTrainedModel, drop: list[int]) -> PreTrainedModel:
    """Remove the decoder layers ``drop``; the others are renumbered (KV-cache slots) and the config follows."""
    family = family_of(model)
    blocks = decoder_layers(model, family)
    kept = [i for i in range(len(blocks)) if i not in set(drop)]
    parent, name = family.layers.rsplit(".", 1)
    setattr(model.get_submodule(parent), name, nn.ModuleList([blocks[i] for i in kept]))
    for new, block in enumerate(decoder_layers(model, family)):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    cfg = model.config
    for key in ("layer_types", "layer_widths"):  # per-layer lists: Gemma 3 / Qwen3 attention types, our widths
        if isinstance(getattr(cfg, key, None), list):
            setattr(cfg, key, [getattr(cfg, key)[i] for i in kept])
    cfg.num_hidden_layers = len(kept)
    return model


def _layer_input(args: tuple, kwargs: dict) -> Tensor:
    """A decoder layer's hidden-state input as a forward hook sees it: [B, T, H]."""
    return args[0] if args else kwargs["hidden_states"]


def _skip(module: nn.Module, args: tuple, kwargs: dict, output):  # noqa: ANN001, ANN202
    """A forward hook that hands the layer's input on as its output (the layer left out)."""
    hidden = _layer_input(args, kwargs)
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _block_influence(model: PreTrainedModel, blocks: nn.ModuleList, batches: list[dict[str, Tensor]]) -> Tensor:
    total, tokens = torch.zeros(len(blocks), dtype=torch.float64), 0

    def hook(i: int):
        def keep(module, args, kwargs, output):  # noqa: ANN001, ANN202
            x = _layer_input(args, kwargs).float()  # [B, T, H]
            y = (output[0] if isinstance(output, tuple) else output).float()
            total[i] += (1 - torch.nn.functional.cosine_similarity(x, y, dim=-1)).sum().double().cpu()

        return keep

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        for batch in batches:
            ids = batch["input_ids"].to(model.device)  # [B, T]
            model(input_ids=ids, use_cache=False)
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return (total / tokens).float()


def _ppl(model: PreTrainedModel, batches: list[dict[str, Tensor]]) -> float:
    losses = [float(model(input_ids=b["input_ids"].to(model.device), labels=b["input_ids"].to(model.device),
                          use_cache=False).loss) for b in batches]  # fmt: skip
    return math.exp(sum(losses) / len(losses))
