"""Per-layer widths as ordinary Hugging Face classes: registered config and model types, no remote code.

A model pruned to different widths per layer is saved with ``model_type`` ``distillprune_<family>`` and its
``layer_widths``; ``import distillprune`` registers these types with the Auto classes, so ``from_pretrained``
builds every layer at its width and then loads the safetensors weights as usual.
"""

from __future__ import annotations

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from distillprune.prune.groups import FAMILIES, Family, Widths, decoder_layers, family_of, head_dim


def resize_layers(model: PreTrainedModel, widths: list[Widths]) -> None:
    """Give every decoder layer fresh projections of the given widths (weights to be loaded or copied in)."""
    adapter, hd = family_of(model), head_dim(model)
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


def pruned_classes(family: Family) -> tuple[type[PretrainedConfig], type[PreTrainedModel]]:
    """The registered config and model classes of ``family`` with per-layer widths."""
    return _PRUNED[family.model]


def _register(name: str, family: Family) -> None:
    config_cls, model_cls = family.config, family.model
    config = type(f"Distillprune{config_cls.__name__}", (config_cls,), {"model_type": f"distillprune_{name}"})

    def __init__(self: PreTrainedModel, cfg: PretrainedConfig) -> None:
        model_cls.__init__(self, cfg)
        resize_layers(self, [Widths(**w) for w in cfg.layer_widths])
        self.post_init()

    model = type(f"Distillprune{model_cls.__name__}", (model_cls,), {"config_class": config, "__init__": __init__})
    AutoConfig.register(config.model_type, config, exist_ok=True)
    AutoModelForCausalLM.register(config, model, exist_ok=True)
    _PRUNED[model_cls] = (config, model)


_PRUNED: dict[type[PreTrainedModel], tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {}
for _name, _family in FAMILIES.items():
    _register(_name, _family)
