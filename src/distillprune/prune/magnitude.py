"""Unstructured magnitude pruning: zero the smallest |w| of the pruned layers' projections to a sparsity target.

The masks stay fixed during recovery (``torch.nn.utils.prune`` reparametrises weight = weight_orig · mask, so a
pruned weight gets no gradient and stays zero), then ``finalize`` folds them into plain weights. The model keeps
its shapes: with dense kernels this gives no speed-up, which the recipe's report shows by measuring it.
"""

from __future__ import annotations

import torch
from torch.nn.utils import prune as torch_prune
from transformers import PreTrainedModel

from distillprune.errors import UserError
from distillprune.prune.groups import decoder_layers, family_of, projections


def magnitude_prune(model: PreTrainedModel, sparsity: float, layers: list[int]) -> float:
    """Mask the globally smallest-magnitude weights of ``layers``; returns the sparsity reached there."""
    check_sparsity(sparsity)
    adapter = family_of(model)
    blocks = decoder_layers(model, adapter)
    linears = [lin for i in layers for lin in projections(blocks[i], adapter)]
    magnitudes = torch.cat([lin.weight.detach().abs().flatten().float() for lin in linears])  # [all weights]
    k = int(sparsity * magnitudes.numel())
    threshold = torch.kthvalue(magnitudes, k).values if k > 0 else torch.tensor(-1.0)
    zeros = 0
    for lin in linears:
        mask = (lin.weight.detach().abs().float() > threshold).to(lin.weight.dtype)
        torch_prune.custom_from_mask(lin, "weight", mask)
        zeros += int((mask == 0).sum())
    return zeros / magnitudes.numel()


def check_sparsity(sparsity: float) -> None:
    """A one-line error for a sparsity outside [0, 1)."""
    if not 0.0 <= sparsity < 1.0:
        raise UserError(f"prune.sparsity must be in [0, 1), got {sparsity}")


def finalize(model: PreTrainedModel) -> None:
    """Fold the fixed masks into plain ``weight`` tensors (zeros stay zeros) so the model saves as usual."""
    for module in model.modules():
        if torch_prune.is_pruned(module) and hasattr(module, "weight_mask"):
            torch_prune.remove(module, "weight")


def sparsity_of(model: PreTrainedModel, layers: list[int]) -> float:
    """Share of exact zeros in the projections of ``layers``."""
    adapter = family_of(model)
    blocks = decoder_layers(model, adapter)
    weights = [lin.weight for i in layers for lin in projections(blocks[i], adapter)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
