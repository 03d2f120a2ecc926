"""Importance of heads, KV groups and MLP channels from calibration data (LLM-Pruner, Minitron).

Element scores per weight: ``random``, ``l1`` |w|, ``l2`` w², ``taylor`` |w·g| (g: gradient of the summed
calibration loss; first order, element-wise), ``taylor_vector`` |Σ w·g| over each part of a group,
``taylor2`` ½·w²·F with F the Fisher diagonal (mean of per-sample g²). ``activation`` is forward-only: the L2
norm of each head's output and each channel's activation over the calibration tokens (Minitron). Parts of a group
(q rows and o columns of a head; k and v rows of a KV head; gate, up rows and down column of a channel) are
combined with ``aggregation``: sum, mean, max or prod. Gradients exist only for the projections of the layers
being pruned, accumulate in place across batches, and are reduced to group scores right away.
"""

from __future__ import annotations

import resource
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel

from distillprune.errors import UserError
from distillprune.prune.groups import Part, decoder_layers, family_of, head_dim, parts, projections

METHODS = ("random", "l1", "l2", "taylor", "taylor_vector", "taylor2", "activation")  # = choices.IMPORTANCE
AGGREGATIONS = {"sum": torch.sum, "mean": torch.mean, "max": lambda t, dim: t.max(dim=dim).values, "prod": torch.prod}


@dataclass
class LayerScores:
    heads: Tensor  # [n_q] one score per query head
    kv_heads: Tensor  # [n_kv] one score per KV group (its k, v rows and its query heads)
    channels: Tensor  # [intermediate]


def score(
    model: PreTrainedModel,
    batches: Iterable[dict[str, Tensor]],
    method: str,
    layers: list[int],
    aggregation: str = "sum",
    seed: int = 0,
) -> tuple[dict[int, LayerScores], float]:
    """Scores for ``layers`` and the peak memory (MB) so far: the process's resident memory on the CPU, the
    allocated memory of the model's GPU on CUDA. The batches go to the model's device."""
    if method not in METHODS:
        raise UserError(f"prune.importance '{method}' is unknown; choose {', '.join(METHODS)}")
    if aggregation not in AGGREGATIONS:
        raise UserError(f"prune.aggregation '{aggregation}' is unknown; choose {', '.join(AGGREGATIONS)}")
    adapter = family_of(model)
    blocks = decoder_layers(model, adapter)
    params = {i: projections(blocks[i], adapter) for i in layers}
    fisher: dict[int, list[Tensor] | None] = {}
    activations: dict[int, list[Tensor]] = {}
    if method == "activation":
        activations = _activation_norms(model, blocks, adapter, batches, layers)
    elif method.startswith("taylor"):
        fisher = _gradients(model, params, batches, squared=method == "taylor2")
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in layers:
        found = (fisher.get(i), activations.get(i))
        out[i] = _group_scores(model, parts(blocks[i], adapter), params[i], method, aggregation, *found, gen)
    model.zero_grad(set_to_none=True)
    if model.device.type == "cuda":
        return out, torch.cuda.max_memory_allocated(model.device) / 2**20
    return out, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _gradients(model, params, batches, squared: bool) -> dict[int, list[Tensor]]:
    """Leave the summed calibration gradient in each projection's ``.grad``; with ``squared``, also return the
    Fisher diagonal (mean per-sample g²), for which every sample's gradient is taken on its own."""
    was = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    linears = [lin for group in params.values() for lin in group]
    for lin in linears:
        lin.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    total = [torch.zeros_like(lin.weight) for lin in linears] if squared else []
    fisher = [torch.zeros_like(lin.weight, dtype=torch.float32) for lin in linears] if squared else []
    n = 0
    for batch in batches:
        for row in range(batch["input_ids"].shape[0]):  # one sample at a time: F needs per-sample gradients
            ids = batch["input_ids"][row : row + 1].to(model.device)  # [1, T]
            model(input_ids=ids, labels=ids).loss.backward()
            n += 1
            if squared:
                for j, lin in enumerate(linears):
                    total[j] += lin.weight.grad
                    fisher[j] += lin.weight.grad.float() ** 2
                    lin.weight.grad = None
    if squared:
        for lin, grad in zip(linears, total, strict=True):
            lin.weight.grad = grad
    for p, flag in zip(model.parameters(), was, strict=True):
        p.requires_grad_(flag)
    if n == 0:
        raise UserError("no calibration samples: prune.calibration.samples must be > 0")
    out, start = {}, 0
    for i, group in params.items():  # back to {layer: [per-projection Fisher]}
        out[i] = [f / n for f in fisher[start : start + len(group)]] if squared else None
        start += len(group)
    return out


@torch.no_grad()
def _activation_norms(model, blocks, adapter, batches, layers) -> dict[int, list[Tensor]]:
    sums: dict[int, list[Tensor]] = {}
    hooks = []
    for i in layers:
        p = parts(blocks[i], adapter)

        def keep(idx: int, slot: int):
            def hook(module, args):
                x = args[0].float()  # [B, T, features]
                total = (x * x).sum(dim=(0, 1))
                sums.setdefault(idx, [torch.zeros_like(total), None])
                sums[idx][slot] = total if sums[idx][slot] is None else sums[idx][slot] + total

            return hook

        hooks.append(p["o"].linear.register_forward_pre_hook(keep(i, 0)))
        hooks.append(p["down"].linear.register_forward_pre_hook(keep(i, 1)))
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            model(
                input_ids=batch["input_ids"].to(model.device),
                attention_mask=None if mask is None else mask.to(model.device),
            )
    finally:
        for h in hooks:
            h.remove()
    return sums


def _group_scores(model, layer_parts: dict[str, Part], modules, method, aggregation, extra, activations, gen):  # noqa: ANN001, ANN202
    """One layer's scores from element scores of its projection ``modules`` (each once), cut into its parts."""
    hd = head_dim(model)
    n_q, n_kv, n_ch = layer_parts["q"].size // hd, layer_parts["k"].size // hd, layer_parts["up"].size
    agg = AGGREGATIONS[aggregation]
    group = n_q // n_kv
    if method == "activation":
        head_out, channel_act = activations
        heads = head_out.view(n_q, hd).sum(dim=1).sqrt()
        return LayerScores(heads, heads.view(n_kv, group).sum(dim=1), channel_act.sqrt())

    def element(j: int, lin: torch.nn.Linear) -> Tensor:
        w = lin.weight.detach().float()
        if method == "random":
            return torch.rand(w.shape, generator=gen)
        if method == "l1":
            return w.abs()
        if method == "l2":
            return w * w
        g = lin.weight.grad.float()
        if method == "taylor":
            return (w * g).abs()
        if method == "taylor_vector":
            return w * g  # summed per part below, then |.|
        return 0.5 * w * w * extra[j]  # taylor2

    by_module = [element(j, lin) for j, lin in enumerate(modules)]

    def e(name: str) -> Tensor:  # [rows or out, in] the part's element scores
        part = layer_parts[name]
        full = next(t for t, m in zip(by_module, modules, strict=True) if m is part.linear)
        return full if name in ("o", "down") else full[part.start : part.start + part.size]

    finish = (lambda t: t.abs()) if method == "taylor_vector" else (lambda t: t)
    rows = lambda t, n: finish(t.reshape(n, -1).sum(dim=1))  # noqa: E731 - [n] per block of output rows
    cols = lambda t, n: finish(t.reshape(t.shape[0], n, -1).sum(dim=(0, 2)))  # noqa: E731 - per input columns
    head_parts = torch.stack([rows(e("q"), n_q), cols(e("o"), n_q)])  # [2, n_q]
    heads = agg(head_parts, dim=0)
    kv_parts = torch.stack([rows(e("k"), n_kv), rows(e("v"), n_kv), heads.view(n_kv, group).sum(dim=1)])
    channel_parts = torch.stack([rows(e("gate"), n_ch), rows(e("up"), n_ch), cols(e("down"), n_ch)])
    return LayerScores(heads, agg(kv_parts, dim=0), agg(channel_parts, dim=0))
