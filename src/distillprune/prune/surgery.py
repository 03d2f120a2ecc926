"""Selection and surgery: how many heads and channels go, which ones, and physically smaller layers.

``plan`` turns a parameter ratio into per-layer widths (checked before any scoring), ``select`` picks the
structures to keep from importance scores, ``apply`` slices the projections and updates the config: equal widths
in every layer give a stock config; different widths give the registered per-layer type (``modeling.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from distillprune.errors import UserError
from distillprune.prune.groups import (
    FAMILIES,
    Part,
    Widths,
    base_type,
    decoder_layers,
    family_of,
    head_dim,
    layer_widths,
    parts,
    row_modules,
    set_counts,
)
from distillprune.prune.importance import LayerScores
from distillprune.prune.modeling import pruned_classes

GQA_MODES = ("kv_groups", "q_per_group")  # = choices.GQA_MODES (validation reads those, torch-free)


@dataclass
class Plan:
    """Target widths of the pruned layers, per layer (the same in every layer unless the ratio is spread)."""

    layers: list[int]
    kv_heads: dict[int, int]
    heads: dict[int, int]
    channels: dict[int, int] = field(default_factory=dict)
    removed_params: int = 0
    shares: dict[int, float] = field(default_factory=dict)  # each layer's share of the mean layer's part


def plan(
    model: PreTrainedModel,
    ratio: float,
    layers: list[int],
    gqa: str,
    round_to: int = 1,
    parts: tuple[str, ...] = ("heads", "channels"),
    shares: dict[int, float] | None = None,
) -> Plan:
    """Head and channel counts that remove about ``ratio`` of all parameters from ``layers``, taking from the
    ``parts`` named (``heads``, ``channels`` or both); with ``shares`` (averaging 1: ``allocation.allocate``),
    layer i gives ``shares[i]`` times the mean layer's part, a share no layer can give capped at what it can
    and the rest passed to the others (``cap_shares``). A one-line error when that cannot be done (GQA
    divisibility, too few heads or channels)."""
    if gqa not in GQA_MODES:
        raise UserError(f"prune.gqa '{gqa}' is unknown; choose {', '.join(GQA_MODES)}")
    if not 0.0 <= ratio < 1.0:
        raise UserError(f"prune.ratio must be in [0, 1), got {ratio}")
    if not parts or set(parts) - {"heads", "channels"}:
        raise UserError(f"prune.parts {list(parts)}: choose heads, channels or both")
    widths, hd, hidden = layer_widths(model), head_dim(model), model.config.hidden_size
    n_layers = len(widths)
    if not layers or any(not 0 <= i < n_layers for i in layers):
        raise UserError(f"prune.layers must be indices in [0, {n_layers - 1}], got {layers}")
    first = widths[layers[0]]
    if any(widths[i] != first for i in layers):
        raise UserError("the layers to prune already have different widths; prune them in separate passes")
    target = ratio * sum(p.numel() for p in model.parameters())
    per_head, per_kv, per_channel = 2 * hd * hidden, 2 * hd * hidden, 3 * hidden  # q rows + o cols; k + v rows
    attention = first.heads * per_head + first.kv_heads * per_kv
    mlp = first.intermediate * per_channel
    prunable = (attention if "heads" in parts else 0) + (mlp if "channels" in parts else 0)  # per layer
    group = first.heads // first.kv_heads
    fits = lambda n: not family_of(model).heads_divide_hidden or hidden % n == 0  # noqa: E731
    kv_groups = effective_mode(gqa, first) == "kv_groups"

    def layer_plan(budget: float) -> tuple[int, int, int, int] | None:
        """(KV heads, heads, channels, parameters removed) of a layer that gives ``budget`` parameters; None
        when it cannot."""
        fraction = budget / prunable
        kv, heads = first.kv_heads, first.heads
        if "heads" in parts and kv_groups:
            kv = _nearest(first.kv_heads - fraction * first.kv_heads, first.kv_heads, lambda n: fits(n * group))
            heads = kv * group
        elif "heads" in parts:
            heads = _nearest(group - fraction * group, group, lambda n, kv=kv: fits(n * kv)) * kv
        removed = (first.heads - heads) * per_head + (first.kv_heads - kv) * per_kv
        keep = first.intermediate
        if "channels" in parts:
            keep = first.intermediate - max(0.0, budget - removed) / per_channel
            keep = round_to * math.floor(keep / round_to + 0.5) if round_to > 1 else round(keep)
        nothing = ratio > 0 and removed == 0 and "channels" not in parts and not shares  # a spread may give 0
        if keep < max(1, round_to) or fraction >= 1 or nothing:
            return None
        keep = min(keep, first.intermediate)
        return kv, heads, keep, removed + (first.intermediate - keep) * per_channel

    mean = target / len(layers)  # parameters the mean layer gives
    # heads only: whole heads cannot always carry a spread's budgets; it may miss the target by one head step
    # (a query head from every group, or a whole group) more than the uniform widths do, and remove something
    step = group * per_head + per_kv if kv_groups else first.kv_heads * per_head
    uniform_miss = abs(len(layers) * ((layer_plan(mean) or (0, 0, 0, 0))[3]) - target)
    most = math.inf  # the largest share one layer may give: lowered until every layer's share can be met
    while True:
        given = cap_shares(shares, most) if shares else dict.fromkeys(layers, 1.0)
        rows = {i: layer_plan(mean * given[i]) for i in layers}
        bad = [i for i in layers if rows[i] is None]
        if not bad and shares and "channels" not in parts:
            removed = sum(r[3] for r in rows.values())
            if abs(removed - target) > uniform_miss + step or removed == 0 < ratio:
                bad = [max(layers, key=lambda i: given[i])]  # the largest shares ask for more than heads give
        if not bad:
            break
        if shares and most > 1.0 and any(given[i] > 1.0 for i in bad):
            most = max(1.0, min(given[i] for i in bad if given[i] > 1.0) * 0.99)
            continue
        i = bad[0]
        where = f"layers {layers[0]}..{layers[-1]}" if not shares else f"layer {i} (share {given[i]:.2f})"
        raise UserError(
            f"prune.ratio={ratio} cannot be met on {where} from {'+'.join(parts)} "
            f"({first.heads} heads, {first.kv_heads} KV heads, {first.intermediate} channels per layer); "
            "prune more layers or parts, or a smaller ratio" + (" or spread" if shares else "")
        )
    out = Plan(layers, {}, {}, shares=given)
    for i, (kv, heads, keep, removed) in rows.items():  # every row planned
        out.kv_heads[i], out.heads[i], out.channels[i] = kv, heads, keep
        out.removed_params += removed
    return out


def cap_shares(shares: dict[int, float], most: float) -> dict[int, float]:
    """``shares`` (averaging 1) with none above ``most`` (>= 1): the layers over it give ``most`` and their
    excess goes to the others in proportion to their shares (water-filling), so the shares still average 1 and
    keep their order."""
    if max(shares.values()) <= most:
        return dict(shares)
    order = sorted(shares, key=lambda i: -shares[i])  # largest first
    n = len(order)
    for k in range(1, n + 1):  # the k largest are capped; the rest scale up to carry the excess
        rest = sum(shares[i] for i in order[k:])
        scale = (n - k * most) / rest if rest > 0 else 0.0
        if k == n or shares[order[k]] * scale <= most + 1e-12:
            return {i: most if j < k else shares[i] * scale for j, i in enumerate(order)}
    raise AssertionError("unreachable")


def select(
    scores: dict[int, LayerScores], the_plan: Plan, widths: list[Widths], gqa: str, uniform: bool, round_to: int = 1
) -> dict[int, dict[str, list[int]]]:
    """Indices to keep per pruned layer: ``heads``, ``kv_heads``, ``channels`` (sorted). With ``uniform=False``
    channels are ranked across layers (each layer's scores divided by their mean), so widths differ per layer."""
    counts = dict(the_plan.channels)
    if not uniform:
        counts = _global_channel_counts(scores, the_plan, widths, round_to)
    out = {}
    for i in the_plan.layers:
        w, s = widths[i], scores[i]
        group = w.heads // w.kv_heads
        if effective_mode(gqa, w) == "kv_groups":
            kv = _top(s.kv_heads, the_plan.kv_heads[i])
            heads = [g * group + j for g in kv for j in range(group)]
        else:
            kv = list(range(w.kv_heads))
            per_group = the_plan.heads[i] // w.kv_heads
            heads = [g * group + j for g in kv for j in sorted(_top(s.heads[g * group : (g + 1) * group], per_group))]
        out[i] = {"heads": heads, "kv_heads": kv, "channels": _top(s.channels, counts[i])}
    return out


def apply(model: PreTrainedModel, keep: dict[int, dict[str, list[int]]]) -> PreTrainedModel:
    """Slice the kept structures into smaller Linear layers and rewrite the config (stock or per-layer)."""
    adapter, hd = family_of(model), head_dim(model)
    blocks = decoder_layers(model, adapter)
    for i, k in keep.items():
        p = parts(blocks[i], adapter)
        q_rows, kv_rows = _head_rows(k["heads"], hd), _head_rows(k["kv_heads"], hd)
        channels = torch.tensor(k["channels"], dtype=torch.long)
        rows = {"q": q_rows, "k": kv_rows, "v": kv_rows, "gate": channels, "up": channels}
        set_rows(p, {name: _take(p[name], idx) for name, idx in rows.items()})
        for name, idx in (("o", q_rows), ("down", channels)):
            setattr(p[name].owner, p[name].name, _cols(p[name].linear, idx))
    rewrite_config(model, hd)
    return model


def set_rows(p: dict[str, Part], new: dict[str, tuple[Tensor, Tensor | None]]) -> None:
    """Replace the row parts named in ``new`` by the given (weight, bias) rows; a fused projection is rebuilt
    from all its parts in order, the ones not named kept as they are."""
    for names in row_modules(p):
        if not set(names) & set(new):
            continue
        first = p[names[0]]
        lin = first.linear
        blocks = [new[n] if n in new else _take(p[n], None) for n in names]
        weight = torch.cat([w for w, _ in blocks])  # [rows, in]
        linear = nn.Linear(lin.in_features, weight.shape[0], bias=lin.bias is not None, device=weight.device,
                           dtype=weight.dtype)  # fmt: skip
        with torch.no_grad():
            linear.weight.copy_(weight)
            if lin.bias is not None:
                linear.bias.copy_(torch.cat([b for _, b in blocks]))
        setattr(first.owner, first.name, linear)


def rewrite_config(model: PreTrainedModel, hd: int) -> None:
    """The config after surgery: a stock config when every layer has the same widths, else the registered
    per-layer type (``modeling``); each layer's modules are told their counts."""
    widths = layer_widths(model)
    cfg = model.config
    cfg.head_dim = hd  # never recomputed from hidden_size / heads: RoPE and the projections keep head_dim
    if all(w == widths[0] for w in widths):
        cfg.num_attention_heads, cfg.num_key_value_heads = widths[0].heads, widths[0].kv_heads
        cfg.intermediate_size = widths[0].intermediate
        if hasattr(cfg, "layer_widths"):  # a per-layer model pruned back to uniform stays its registered type
            cfg.layer_widths = [w.as_dict() for w in widths]
    else:
        family = base_type(model)
        config_cls, model_cls = pruned_classes(FAMILIES[family])
        data = cfg.to_dict()
        data.update(model_type=config_cls.model_type, base_model_type=family)
        data["layer_widths"] = [w.as_dict() for w in widths]
        data["architectures"] = [model_cls.__name__]
        new = config_cls(**{k: v for k, v in data.items() if k != "model_type"})
        new._attn_implementation = cfg._attn_implementation
        model.config = new
        for module in model.modules():
            if hasattr(module, "config") and module is not model:
                module.config = new
        model.__class__ = model_cls
    adapter = family_of(model)
    for layer, w in zip(decoder_layers(model, adapter), widths, strict=True):
        set_counts(layer, adapter, model.config, w)


def effective_mode(gqa: str, widths: Widths) -> str:
    """Without GQA (one query head per KV head) a head and its KV head leave together: kv_groups either way."""
    return "kv_groups" if widths.heads == widths.kv_heads else gqa


def _nearest(target: float, most: int, allowed: Callable[[int], bool]) -> int:
    """The allowed count in [1, most] closest to ``target`` (the larger on a tie; ``most`` is always allowed)."""
    return min((n for n in range(1, most + 1) if allowed(n) or n == most), key=lambda n: (abs(n - target), -n))


def _top(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.topk(scores.float(), k).indices.tolist())


def _head_rows(heads: list[int], hd: int) -> torch.Tensor:
    return torch.tensor([h * hd + j for h in heads for j in range(hd)], dtype=torch.long)


def _take(part: Part, idx: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Rows ``idx`` of a row part (all of them for None): its weight rows and bias entries."""
    lin = part.linear
    rows = torch.arange(part.start, part.start + part.size) if idx is None else part.start + idx
    rows = rows.to(lin.weight.device)
    with torch.no_grad():
        return lin.weight[rows].clone(), None if lin.bias is None else lin.bias[rows].clone()


def _cols(lin: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    new = nn.Linear(
        len(idx), lin.out_features, bias=lin.bias is not None, device=lin.weight.device, dtype=lin.weight.dtype
    )
    with torch.no_grad():
        new.weight.copy_(lin.weight[:, idx])
        if lin.bias is not None:
            new.bias.copy_(lin.bias)
    return new


def _global_channel_counts(scores, the_plan: Plan, widths: list[Widths], round_to: int) -> dict[int, int]:
    total_keep = sum(the_plan.channels.values())
    normed = torch.cat([scores[i].channels / scores[i].channels.mean().clamp(min=1e-12) for i in the_plan.layers])
    owner = torch.cat([torch.full((len(scores[i].channels),), i) for i in the_plan.layers])
    kept = owner[torch.topk(normed, total_keep).indices]
    counts = {}
    for i in the_plan.layers:
        n = int((kept == i).sum())
        n = max(round_to, round_to * round(n / round_to)) if round_to > 1 else max(1, n)
        counts[i] = min(n, widths[i].intermediate)
    return counts
