"""Per-layer widths as ordinary Hugging Face classes: registered config and model types, no remote code.

A model pruned to different widths per layer is saved with ``model_type`` ``distillprune_<family>`` and its
``layer_widths``; ``import distillprune`` registers these types with the Auto classes, so ``from_pretrained``
builds every layer at its width and then loads the safetensors weights as usual.
"""

from __future__ import annotations

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from distillprune.prune.groups import (
    FAMILIES,
    Family,
    Widths,
    decoder_layers,
    family_of,
    head_dim,
    parts,
    row_modules,
    set_counts,
)


def resize_layers(model: PreTrainedModel, widths: list[Widths]) -> None:
    """Give every decoder layer fresh projections of the given widths (weights to be loaded or copied in)."""
    adapter, hd = family_of(model), head_dim(model)
    for layer, w in zip(decoder_layers(model, adapter), widths, strict=True):
        p = parts(layer, adapter)
        rows = {"q": w.heads * hd, "k": w.kv_heads * hd, "v": w.kv_heads * hd, "gate": w.intermediate,
                "up": w.intermediate}  # fmt: skip
        for names in row_modules(p):  # a fused projection holds the rows of all its parts
            first = p[names[0]]
            setattr(first.owner, first.name, _like(first.linear, out_features=sum(rows[n] for n in names)))
        for name, n in (("o", w.heads * hd), ("down", w.intermediate)):
            setattr(p[name].owner, p[name].name, _like(p[name].linear, in_features=n))
        set_counts(layer, adapter, model.config, w)


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
