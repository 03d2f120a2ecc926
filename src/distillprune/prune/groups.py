"""The pruning families, one entry each in ``FAMILIES``, and the coupled structures of a decoder layer that they
declare (no graph tracing).

An attention head is its ``head_dim`` rows of q_proj (and, for a KV head, of k_proj and v_proj, biases included)
and its ``head_dim`` input columns of o_proj. An MLP channel is a row of gate_proj and up_proj and a column of
down_proj. With grouped-query attention, query head h reads KV head h // (heads / kv_heads). A family with fused
projections (Phi-3: ``qkv_proj`` holds the q, then k, then v rows; ``gate_up_proj`` the gate, then up rows) has the
same seven ``Part``s, each a block of rows of one module. Per-head norms (Qwen3 and Gemma 3 ``q_norm``/``k_norm``)
act on ``head_dim`` and are shared by all heads: pruning heads leaves them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from distillprune.errors import UserError


@dataclass(frozen=True)
class Family:
    """What pruning needs of one architecture: its Hugging Face config and model classes (the per-layer pruned
    type subclasses them, ``modeling``) and where it keeps its decoder layers and projections (Llama, Mistral,
    Qwen2/3 and Gemma 3 share the names; ``qkv`` and ``gate_up`` name fused projections)."""

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
    qkv: str | None = None  # one projection with the q, k and v rows in that order
    gate_up: str | None = None  # one projection with the gate, then the up rows
    heads_divide_hidden: bool = False  # the stock config refuses a hidden size that the head count does not divide


# a new architecture is one entry here (and its name in ``choices.PRUNABLE``, which validation reads torch-free)
FAMILIES = {
    # Llama 2/3.x: rope scaling and EOS lists live in the config, which pruning keeps
    "llama": Family(LlamaConfig, LlamaForCausalLM, heads_divide_hidden=True),
    "mistral": Family(MistralConfig, MistralForCausalLM),
    "qwen2": Family(Qwen2Config, Qwen2ForCausalLM),
    "qwen3": Family(Qwen3Config, Qwen3ForCausalLM),
    "gemma3_text": Family(Gemma3TextConfig, Gemma3ForCausalLM, heads_divide_hidden=True),
    "phi3": Family(Phi3Config, Phi3ForCausalLM, qkv="qkv_proj", gate_up="gate_up_proj"),
}


@dataclass(frozen=True)
class Part:
    """One of a layer's seven parts: rows ``start : start + size`` of the projection ``name`` of ``owner`` (the
    attention or MLP module); for o and down, its ``size`` input columns."""

    owner: nn.Module
    name: str
    start: int
    size: int

    @property
    def linear(self) -> nn.Linear:
        return self.owner.get_submodule(self.name)


PARTS = ("q", "k", "v", "o", "gate", "up", "down")
ROW_PARTS = ("q", "k", "v", "gate", "up")  # the others (o, down) are input columns


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


def parts(layer: nn.Module, family: Family) -> dict[str, Part]:
    """A decoder layer's seven parts, keyed by ``PARTS``."""
    attn, mlp = layer.get_submodule(family.attn), layer.get_submodule(family.mlp)
    q_rows, channels = attn.get_submodule(family.o).in_features, mlp.get_submodule(family.down).in_features
    if family.qkv:
        kv_rows = (attn.get_submodule(family.qkv).out_features - q_rows) // 2
        out = {"q": Part(attn, family.qkv, 0, q_rows), "k": Part(attn, family.qkv, q_rows, kv_rows),
               "v": Part(attn, family.qkv, q_rows + kv_rows, kv_rows)}  # fmt: skip
    else:
        names = {"q": family.q, "k": family.k, "v": family.v}
        out = {p: Part(attn, n, 0, attn.get_submodule(n).out_features) for p, n in names.items()}
    out["o"] = Part(attn, family.o, 0, q_rows)
    if family.gate_up:
        out |= {"gate": Part(mlp, family.gate_up, 0, channels), "up": Part(mlp, family.gate_up, channels, channels)}
    else:
        out |= {"gate": Part(mlp, family.gate, 0, channels), "up": Part(mlp, family.up, 0, channels)}
    out["down"] = Part(mlp, family.down, 0, channels)
    return out


def row_modules(p: dict[str, Part]) -> list[list[str]]:
    """The row parts grouped by the projection that holds them, in order: [[q], [k], [v], [gate], [up]], or
    [[q, k, v], [gate, up]] for fused projections."""
    modules: dict[tuple[int, str], list[str]] = {}
    for name in ROW_PARTS:
        modules.setdefault((id(p[name].owner), p[name].name), []).append(name)
    return list(modules.values())


def projections(layer: nn.Module, family: Family) -> list[nn.Linear]:
    """A decoder layer's projection modules, each once, in the order of ``PARTS`` (seven, or five when fused)."""
    unique = {id(p.linear): p.linear for p in parts(layer, family).values()}
    return list(unique.values())


def set_counts(layer: nn.Module, family: Family, config: PretrainedConfig, w: Widths) -> None:
    """Tell a layer's attention and MLP modules their new head and channel counts (what their forward reads)."""
    attn, mlp = layer.get_submodule(family.attn), layer.get_submodule(family.mlp)
    attn.num_key_value_groups = w.heads // w.kv_heads
    if hasattr(attn, "num_key_value_heads"):  # Phi-3 splits its fused rows with it
        attn.num_key_value_heads = w.kv_heads
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = w.intermediate
    if hasattr(attn, "config"):  # Phi-3 reads the query width from the config in forward
        own = w.heads != config.num_attention_heads or w.kv_heads != config.num_key_value_heads
        counts = {"num_attention_heads": w.heads, "num_key_value_heads": w.kv_heads}
        attn.config = LayerConfig(config, **counts) if own else config


class LayerConfig:
    """The model's config as one layer sees it: its own head counts, everything else read from (and written to)
    the shared config."""

    def __init__(self, base: PretrainedConfig, **own: Any) -> None:
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_own", own)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        own = object.__getattribute__(self, "_own")
        return own[name] if name in own else getattr(object.__getattribute__(self, "_base"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._base, name, value)


def head_dim(model: PreTrainedModel) -> int:
    cfg = model.config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def layer_widths(model: PreTrainedModel) -> list[Widths]:
    """Current widths of every layer, read from the weights (per-layer pruned models included)."""
    adapter, hd = family_of(model), head_dim(model)
    out = []
    for layer in decoder_layers(model, adapter):
        p = parts(layer, adapter)
        out.append(Widths(p["q"].size // hd, p["k"].size // hd, p["up"].size))
    return out
