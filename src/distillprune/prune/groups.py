"""The pruning families, one entry each in ``FAMILIES``, and the coupled structures of a decoder layer that they
declare (no graph tracing).

An attention head is its ``head_dim`` rows of q_proj (and, for a KV head, of k_proj and v_proj, biases included)
and its ``head_dim`` input columns of o_proj. An MLP channel is a row of gate_proj and up_proj and a column of
down_proj. With grouped-query attention, query head h reads KV head h // (heads / kv_heads).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from distillprune.errors import UserError


@dataclass(frozen=True)
class Family:
    """What pruning needs of one architecture: its Hugging Face config and model classes (the per-layer pruned
    type subclasses them, ``modeling``) and where it keeps its decoder layers and projections (Llama, Mistral
    and Qwen2 share the names)."""

    config: type[PretrainedConfig]
    model: type[PreTrainedModel]
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


# a new architecture is one entry here (and its name in ``choices.PRUNABLE``, which validation reads torch-free)
FAMILIES = {
    "llama": Family(LlamaConfig, LlamaForCausalLM),
    "mistral": Family(MistralConfig, MistralForCausalLM),
    "qwen2": Family(Qwen2Config, Qwen2ForCausalLM),
}


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


def family_of(model: PreTrainedModel) -> Family:
    """The model's pruning family, or a one-line error naming the supported ones."""
    kind = base_type(model)
    if kind not in FAMILIES:
        raise UserError(f"pruning supports {', '.join(sorted(FAMILIES))}; '{kind}' has no adapter")
    return FAMILIES[kind]


def decoder_layers(model: PreTrainedModel, family: Family) -> nn.ModuleList:
    """The model's decoder layers."""
    return model.get_submodule(family.layers)


def projections(layer: nn.Module, family: Family) -> list[nn.Linear]:
    """A decoder layer's seven projections: q, k, v, o, then gate, up, down."""
    attn, mlp = layer.get_submodule(family.attn), layer.get_submodule(family.mlp)
    return [attn.get_submodule(n) for n in (family.q, family.k, family.v, family.o)] + [
        mlp.get_submodule(n) for n in (family.gate, family.up, family.down)
    ]


def head_dim(model: PreTrainedModel) -> int:
    cfg = model.config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def layer_widths(model: PreTrainedModel) -> list[Widths]:
    """Current widths of every layer, read from the weights (per-layer pruned models included)."""
    adapter, hd = family_of(model), head_dim(model)
    out = []
    for layer in decoder_layers(model, adapter):
        attn, mlp = layer.get_submodule(adapter.attn), layer.get_submodule(adapter.mlp)
        q, k = attn.get_submodule(adapter.q), attn.get_submodule(adapter.k)
        out.append(Widths(q.out_features // hd, k.out_features // hd, mlp.get_submodule(adapter.up).out_features))
    return out
