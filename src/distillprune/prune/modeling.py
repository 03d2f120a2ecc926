"""Per-layer widths as ordinary Hugging Face classes: registered config and model types, no remote code.

A model pruned to different widths per layer is saved with ``model_type`` ``distillprune_<family>`` and its
``layer_widths``; ``import distillprune`` registers these types with the Auto classes, so ``from_pretrained``
builds every layer at its width and then loads the safetensors weights as usual.
"""

from __future__ import annotations

from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from distillprune.prune.groups import ADAPTERS, Widths, adapter_for, decoder_layers, head_dim

PRUNED_CLASSES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {}


def resize_layers(model: PreTrainedModel, widths: list[Widths]) -> None:
    """Give every decoder layer fresh projections of the given widths (weights to be loaded or copied in)."""
    adapter, hd = adapter_for(model), head_dim(model)
    for layer, w in zip(decoder_layers(model, adapter), widths, strict=True):
        attn, mlp = layer.get_submodule(adapter.attn), layer.get_submodule(adapter.mlp)
        for name, rows in ((adapter.q, w.heads * hd), (adapter.k, w.kv_heads * hd), (adapter.v, w.kv_heads * hd)):
            setattr(attn, name, _like(attn.get_submodule(name), out_features=rows))
        setattr(attn, adapter.o, _like(attn.get_submodule(adapter.o), in_features=w.heads * hd))
        attn.num_key_value_groups = w.heads // w.kv_heads
        for name in (adapter.gate, adapter.up):
            setattr(mlp, name, _like(mlp.get_submodule(name), out_features=w.intermediate))
        setattr(mlp, adapter.down, _like(mlp.get_submodule(adapter.down), in_features=w.intermediate))
        mlp.intermediate_size = w.intermediate


def _like(linear: nn.Linear, in_features: int | None = None, out_features: int | None = None) -> nn.Linear:
    return nn.Linear(
        in_features or linear.in_features,
        out_features or linear.out_features,
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )


def _register(family: str, config_cls: type[PretrainedConfig], model_cls: type[PreTrainedModel]) -> None:
    name = f"Distillprune{model_cls.__name__}"

    config = type(f"Distillprune{config_cls.__name__}", (config_cls,), {"model_type": f"distillprune_{family}"})

    def __init__(self: PreTrainedModel, cfg: PretrainedConfig) -> None:
        model_cls.__init__(self, cfg)
        resize_layers(self, [Widths(**w) for w in cfg.layer_widths])
        self.post_init()

    model = type(name, (model_cls,), {"config_class": config, "__init__": __init__})
    AutoConfig.register(config.model_type, config, exist_ok=True)
    AutoModelForCausalLM.register(config, model, exist_ok=True)
    PRUNED_CLASSES[family] = (config, model)


for _family, _classes in {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}.items():
    assert _family in ADAPTERS
    _register(_family, *_classes)
