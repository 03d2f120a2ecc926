"""KV-head merging, MHA -> GQA -> MQA (Ainslie et al., 2023): each new KV head is the mean of the K and V
projection heads of the old group it replaces; query heads stay. Query head h read old KV head h // (heads /
kv) and reads new head h // (heads / new): the same group, so merging heads that are equal changes nothing.
Mean-pooling the projections commutes with RoPE (both linear); per-head k norms (Qwen3, Gemma 3) see the pooled
keys. The export is a stock config with ``num_key_value_heads`` = the new count."""

from __future__ import annotations

from transformers import PreTrainedModel

from distillprune.errors import UserError
from distillprune.prune.groups import decoder_layers, family_of, head_dim, layer_widths, parts
from distillprune.prune.surgery import rewrite_config, set_rows
from distillprune.validate import mergeable_kv_heads  # torch-free: validation checks it early


def check(model: PreTrainedModel, kv_heads: int) -> None:
    """A one-line error unless every layer's query heads and KV heads split evenly into ``kv_heads`` groups."""
    for i, w in enumerate(layer_widths(model)):
        if kv_heads not in (fits := mergeable_kv_heads(w.heads, w.kv_heads)):
            raise UserError(
                f"merge.kv_heads={kv_heads}: layer {i} has {w.heads} query heads over {w.kv_heads} KV heads; "
                f"choose one of {', '.join(map(str, fits))}"
            )


def merge_kv_heads(model: PreTrainedModel, kv_heads: int) -> PreTrainedModel:
    """Mean-pool each layer's K and V heads into ``kv_heads`` heads (biases too) and rewrite the config."""
    check(model, kv_heads)
    family, hd = family_of(model), head_dim(model)
    for layer, w in zip(decoder_layers(model, family), layer_widths(model), strict=True):
        if w.kv_heads == kv_heads:
            continue
        p, group = parts(layer, family), w.kv_heads // kv_heads
        new = {}
        for name in ("k", "v"):
            lin, part = p[name].linear, p[name]
            rows = slice(part.start, part.start + part.size)
            weight = lin.weight.detach()[rows].reshape(kv_heads, group, hd, -1).mean(dim=1).reshape(kv_heads * hd, -1)
            bias = None if lin.bias is None else lin.bias.detach()[rows].reshape(kv_heads, group, hd).mean(dim=1)
            new[name] = (weight, None if bias is None else bias.reshape(-1))  # [kv_heads * hd, hidden]
        set_rows(p, new)
    rewrite_config(model, hd)
    return model


def kv_bytes_per_token(model: PreTrainedModel, bytes_per_value: int = 2) -> int:
    """KV-cache bytes per token of context, all layers, K and V, at ``bytes_per_value`` (2: a 16-bit cache)."""
    return sum(2 * w.kv_heads * head_dim(model) * bytes_per_value for w in layer_widths(model))
