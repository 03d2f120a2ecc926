"""Every pruning family on a tiny random model of its own kind (``conftest.FAMILY_TRAITS``): identity at ratio 0,
equality with the dense model whose removed structures are zeroed, and save -> fresh-process reload, for
uniform (stock config) and per-layer widths. Qwen3: per-head q/k norms; Gemma 3: MQA, head_dim 32 > hidden/heads,
sliding-window layers; Phi-3: fused qkv_proj and gate_up_proj; Llama 3: llama3 rope scaling and two EOS ids."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from test_prune import IDS, _fresh_process_logits, _prune, _zeroed
from transformers import AutoModelForCausalLM

from conftest import FAMILY_TRAITS, make_tiny_model
from distillprune.prune import layer_widths
from distillprune.prune.groups import FAMILIES

FAMILY_NAMES = ["qwen3", "gemma3_text", "phi3", "llama3"]


@pytest.fixture(params=FAMILY_NAMES)
def family_model(request, tiny_tokenizer, tmp_path: Path):
    arch = "llama" if request.param == "llama3" else request.param
    extra = {"eos_token_id": [tiny_tokenizer.eos_token_id, tiny_tokenizer.bos_token_id]} if arch == "llama" else {}
    folder = make_tiny_model(tmp_path / request.param, tiny_tokenizer, arch=arch, **FAMILY_TRAITS[arch], **extra)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.config.model_type == arch
    return request.param, model


def test_every_family_is_in_the_table(family_model) -> None:
    name, model = family_model
    assert model.config.model_type in FAMILIES
    fused = name == "phi3"
    assert hasattr(model.model.layers[0].self_attn, "qkv_proj") == fused
    assert hasattr(model.model.layers[0].mlp, "gate_up_proj") == fused


def test_ratio_zero_is_the_identity_for_every_family(family_model) -> None:
    _, model = family_model
    with torch.no_grad():
        before = model(IDS).logits
    pruned, _, _ = _prune(model, layers=range(4), ratio=0.0)
    assert type(pruned).__name__ == type(model).__name__
    with torch.no_grad():
        torch.testing.assert_close(pruned(IDS).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("gqa", ["q_per_group", "kv_groups"])
@pytest.mark.parametrize("uniform", [True, False])
def test_every_family_equals_its_dense_model_with_removed_structures_zeroed(family_model, gqa, uniform) -> None:
    name, model = family_model
    dense = copy.deepcopy(model)
    pruned, keep, _ = _prune(model, method="taylor", gqa=gqa, uniform=uniform, ratio=0.2)
    widths = layer_widths(pruned)
    if name == "gemma3_text":  # MQA: one KV head per layer stays; query heads leave it in q_per_group mode
        assert all(w.kv_heads == 1 for w in widths)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in dense.parameters())
    with torch.no_grad():
        torch.testing.assert_close(pruned(IDS).logits, _zeroed(dense, keep)(IDS).logits, rtol=1e-5, atol=1e-5)
        # the KV cache lines up with the new head counts (sliding-window layers included)
        assert pruned.generate(IDS[:1, :12], max_new_tokens=6, do_sample=False).shape == (1, 18)


@pytest.mark.parametrize("uniform_all", [True, False])
def test_every_family_reloads_in_a_fresh_process(family_model, tmp_path: Path, uniform_all: bool) -> None:
    name, model = family_model
    dense_config = model.config.to_dict()
    pruned, _, _ = _prune(model, layers=range(4) if uniform_all else (1, 2), ratio=0.2)
    folder = tmp_path / "pruned"
    pruned.save_pretrained(folder)
    torch.save(IDS, folder / "ids.pt")
    config = json.loads((folder / "config.json").read_text())
    if uniform_all and name in ("gemma3_text", "llama3"):  # their stock configs refuse heads that miss hidden_size
        assert config["hidden_size"] % config["num_attention_heads"] == 0
    assert (config["model_type"] == dense_config["model_type"]) == uniform_all
    for key in ("rope_parameters", "eos_token_id", "layer_types", "sliding_window", "query_pre_attn_scalar"):
        assert config.get(key) == dense_config.get(key), key  # what makes the family itself survives the export
    with torch.no_grad():
        expected = pruned(IDS).logits
    got = _fresh_process_logits(folder, import_distillprune=not uniform_all)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
