"""Coupled structures of a decoder layer, declared per architecture (no graph tracing).

An attention head is its ``head_dim`` rows of q_proj (and, for a KV head, of k_proj and v_proj, biases included)
and its ``head_dim`` input columns of o_proj. An MLP channel is a row of gate_proj and up_proj and a column of
down_proj. With grouped-query attention, query head h reads KV head h // (heads / kv_heads).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel

from distillprune.errors import UserError


@dataclass(frozen=True)
class Adapter:
    """Where a family keeps its decoder layers and projections (Llama, Mistral and Qwen2 share the names)."""

    layers: str = "model.layers"
    attn: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    mlp: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


ADAPTERS = {"llama": Adapter(), "mistral": Adapter(), "qwen2": Adapter()}


@dataclass
class Widths:
    """One layer's widths: query heads, KV heads, MLP channels."""

    heads: int
    kv_heads: int
    intermediate: int

    def as_dict(self) -> dict[str, int]:
        return {"heads": self.heads, "kv_heads": self.kv_heads, "intermediate": self.intermediate}


def base_type(model: PreTrainedModel) -> str:
    """The architecture family, also for a model this package has already pruned to per-layer widths."""
    return getattr(model.config, "base_model_type", model.config.model_type)


def adapter_for(model: PreTrainedModel) -> Adapter:
    """The adapter of the model's family, or a one-line error naming the supported ones."""
    kind = base_type(model)
    if kind not in ADAPTERS:
        raise UserError(f"pruning supports {', '.join(sorted(ADAPTERS))}; '{kind}' has no adapter")
    return ADAPTERS[kind]


def decoder_layers(model: PreTrainedModel, adapter: Adapter) -> nn.ModuleList:
    """The model's decoder layers."""
    return model.get_submodule(adapter.layers)


def head_dim(model: PreTrainedModel) -> int:
    cfg = model.config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def layer_widths(model: PreTrainedModel) -> list[Widths]:
    """Current widths of every layer, read from the weights (per-layer pruned models included)."""
    adapter, hd = adapter_for(model), head_dim(model)
    out = []
    for layer in decoder_layers(model, adapter):
        attn, mlp = layer.get_submodule(adapter.attn), layer.get_submodule(adapter.mlp)
        q, k = attn.get_submodule(adapter.q), attn.get_submodule(adapter.k)
        out.append(Widths(q.out_features // hd, k.out_features // hd, mlp.get_submodule(adapter.up).out_features))
    return out
