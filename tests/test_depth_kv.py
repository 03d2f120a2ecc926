"""Depth pruning and KV-head merging against dense references: a removed layer equals the dense model with that
layer's output replaced by its input; block influence equals 1 - cos of the hidden states around each layer; the
``ppl`` score equals the PPL of the model without the layer; merged KV heads equal the dense model whose K/V heads
are replaced by their group's mean. Both export stock configs that a fresh process loads without distillprune."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from test_prune import IDS, _fresh_process_logits
from transformers import AutoModelForCausalLM

from conftest import FAMILY_TRAITS, TINY_EVAL, make_tiny_model, run_train
from distillprune.errors import UserError
from distillprune.prune import layer_widths
from distillprune.prune.depth import _skip, block_importance, candidates, choose, remove_layers
from distillprune.prune.groups import decoder_layers, family_of, head_dim, parts
from distillprune.prune.kv_merge import kv_bytes_per_token, merge_kv_heads

FAMILIES = {  # name -> (arch, overrides): GQA Llama, biased Qwen2, fused Phi-3, MHA Mistral, Gemma 3 (sliding, MQA)
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "phi3": ("phi3", {}),
    "mistral_mha": ("mistral", {"num_key_value_heads": 4}),
    "gemma3_text": ("gemma3_text", FAMILY_TRAITS["gemma3_text"]),
}


def _model(name: str, tokenizer, tmp_path: Path):
    arch, extra = FAMILIES[name]
    return AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / name, tokenizer, arch=arch, **extra)).eval()


@pytest.mark.parametrize("name", ["llama", "gemma3_text", "phi3"])
def test_removed_layers_equal_the_dense_model_skipping_them(name: str, tiny_tokenizer, tmp_path: Path) -> None:
    model = _model(name, tiny_tokenizer, tmp_path)
    reference = copy.deepcopy(model)
    handles = [decoder_layers(reference, family_of(reference))[i].register_forward_hook(_skip, with_kwargs=True)
               for i in (1, 2)]  # fmt: skip
    types = list(getattr(model.config, "layer_types", None) or [])
    remove_layers(model, [1, 2])
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1]  # KV-cache slots renumbered
    if types:
        assert model.config.layer_types == [types[0], types[3]]
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, rtol=1e-5, atol=1e-5)
        out = model.generate(IDS[:1, :12], max_new_tokens=6, do_sample=False)  # the cache works with 2 layers
        assert out.shape == (1, 18)
    for h in handles:
        h.remove()
    folder = tmp_path / "depth"
    model.save_pretrained(folder)
    torch.save(IDS, folder / "ids.pt")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == model.config.model_type and config["num_hidden_layers"] == 2
    with torch.no_grad():
        expected = model(IDS).logits
    torch.testing.assert_close(_fresh_process_logits(folder, import_distillprune=False), expected, rtol=0, atol=0)


def test_block_influence_is_one_minus_the_cosine_around_each_layer(tiny_tokenizer, tmp_path: Path) -> None:
    model = _model("llama", tiny_tokenizer, tmp_path)
    batches = [{"input_ids": IDS[:2]}, {"input_ids": IDS[2:]}]
    scores = block_importance(model, batches, "cosine")
    expected = torch.zeros(4)
    with torch.no_grad():
        for b in batches:  # hidden_states[i] is layer i's input; the last entry is after the final norm: skipped
            hs = model(b["input_ids"], output_hidden_states=True).hidden_states
            for i in range(3):
                expected[i] += (1 - torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1)).sum()
    torch.testing.assert_close(scores[:3], expected[:3] / IDS.numel(), rtol=1e-4, atol=1e-6)
    assert scores[3] > 0


def test_the_ppl_score_is_the_perplexity_increase_without_each_layer(tiny_tokenizer, tmp_path: Path) -> None:
    model = _model("gemma3_text", tiny_tokenizer, tmp_path)
    batches = [{"input_ids": IDS}]
    scores = block_importance(model, batches, "ppl")
    with torch.no_grad():
        base = math.exp(float(model(IDS, labels=IDS).loss))
        for i in range(4):
            without = remove_layers(copy.deepcopy(model), [i])
            assert scores[i].item() == pytest.approx(math.exp(float(without(IDS, labels=IDS).loss)) - base, rel=1e-4)


def test_layers_to_remove_are_chosen_among_the_allowed_ones() -> None:
    scores = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.05])
    assert choose(scores, 2, candidates(5, 2, keep_first=True, keep_last=True)) == [1, 2]
    assert choose(scores, 2, candidates(5, 2, keep_first=False, keep_last=False)) == [0, 4]
    with pytest.raises(UserError, match=r"depth.remove=4: the model has 5 layers, of which 3 may go .*choose 1..3"):
        candidates(5, 4, keep_first=True, keep_last=True)
    with pytest.raises(UserError, match="depth.remove=5: the model has 5 layers, of which 5 may go; choose 1..4"):
        candidates(5, 5, keep_first=False, keep_last=False)


def _mean_pooled_reference(model, kv_heads: int):
    """The dense model with every K/V head replaced by the mean of its new group (same shapes, no merging)."""
    ref, hd = copy.deepcopy(model), head_dim(model)
    family = family_of(ref)
    for layer, w in zip(decoder_layers(ref, family), layer_widths(ref), strict=True):
        group = w.kv_heads // kv_heads
        for name in ("k", "v"):
            part = parts(layer, family)[name]
            for tensor in (part.linear.weight, part.linear.bias):
                if tensor is None:
                    continue
                block = tensor.data[part.start : part.start + part.size]
                heads = block.reshape(kv_heads, group, hd, -1)
                block.copy_(heads.mean(dim=1, keepdim=True).expand_as(heads).reshape(block.shape))
    return ref


@pytest.mark.parametrize("name,kv_heads", [("llama", 1), ("qwen2", 1), ("phi3", 1), ("mistral_mha", 2),
                                           ("mistral_mha", 1)])  # fmt: skip
def test_merged_kv_heads_equal_the_dense_model_with_mean_pooled_heads(name, kv_heads, tiny_tokenizer, tmp_path):
    model = _model(name, tiny_tokenizer, tmp_path)
    reference, before = _mean_pooled_reference(model, kv_heads), kv_bytes_per_token(model)
    kv = model.config.num_key_value_heads
    merge_kv_heads(model, kv_heads)
    assert model.config.num_key_value_heads == kv_heads and model.config.model_type == reference.config.model_type
    assert kv_bytes_per_token(model) * kv // kv_heads == before
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, rtol=1e-5, atol=1e-5)
        assert model.generate(IDS[:1, :8], max_new_tokens=4, do_sample=False).shape == (1, 12)
    folder = tmp_path / "merged"
    model.save_pretrained(folder)
    torch.save(IDS, folder / "ids.pt")
    with torch.no_grad():
        expected = model(IDS).logits
    torch.testing.assert_close(_fresh_process_logits(folder, import_distillprune=False), expected, rtol=0, atol=0)


def test_merging_equal_heads_changes_nothing(tiny_tokenizer, tmp_path: Path) -> None:
    model = _model("llama", tiny_tokenizer, tmp_path)
    hd = head_dim(model)
    for layer in model.model.layers:  # both KV heads equal: MQA is then exact
        for lin in (layer.self_attn.k_proj, layer.self_attn.v_proj):
            lin.weight.data[hd:] = lin.weight.data[:hd]
    with torch.no_grad():
        before = model(IDS).logits
        torch.testing.assert_close(merge_kv_heads(model, 1)(IDS).logits, before, rtol=1e-5, atol=1e-5)


def test_a_kv_head_count_that_does_not_divide_is_one_line(tiny_tokenizer, tmp_path: Path) -> None:
    model = _model("llama", tiny_tokenizer, tmp_path)
    with pytest.raises(
        UserError, match="merge.kv_heads=3: layer 0 has 4 query heads over 2 KV heads; choose one of 1, 2"
    ):
        merge_kv_heads(model, 3)


def _structure_overrides(model_dir: Path, data_file: Path, out: Path) -> list[str]:
    return [
        f"model.name={model_dir}", f"data.source={data_file}", "data.seq_len=32", "data.batch_size=2",
        "data.val_batches=2", "data.val_fraction=0.2", "trainer.max_steps=4", "trainer.val_check_interval=2",
        "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=2", "logger.wandb.mode=disabled",
        f"output_dir={out}", "control=false", *TINY_EVAL,
    ]  # fmt: skip


def test_prune_depth_end_to_end(tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "depth"
    calibration = [f"depth.calibration.source={tiny_text_file}", "depth.calibration.seq_len=32",
                   "depth.calibration.samples=4", "depth.remove=2"]  # fmt: skip
    run_train("recipe=prune_depth", *_structure_overrides(tiny_model_dir, tiny_text_file, out), *calibration)
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["removed_layers"]) == 2 and not {0, 3} & set(metrics["removed_layers"])  # first, last kept
    assert len(metrics["block_importance"]) == 4 and len(metrics["widths"]) == 2
    assert set(metrics["val_ppl"]) == {"dense", "pruned", "recovered"}
    assert metrics["kv_bytes_per_token"]["pruned"] * 2 == metrics["kv_bytes_per_token"]["dense"]
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert type(final).__name__ == "LlamaForCausalLM" and final.config.num_hidden_layers == 2
    assert sum(p.numel() for p in final.parameters()) == metrics["params"]["pruned"]
    assert list(metrics["evaluation"]["models"]) == ["dense", "pruned", "recovered"]


def test_merge_kv_end_to_end(tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "merge"
    run_train("recipe=merge_kv", *_structure_overrides(tiny_model_dir, tiny_text_file, out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kv_bytes_per_token"]["pruned"] * 2 == metrics["kv_bytes_per_token"]["dense"]  # 2 KV heads -> 1
    assert all(w["kv_heads"] == 1 and w["heads"] == 4 for w in metrics["widths"])
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert type(final).__name__ == "LlamaForCausalLM" and final.config.num_key_value_heads == 1
    assert set(metrics["val_ppl"]) == {"dense", "pruned", "recovered"}


def test_depth_and_merge_bad_input_is_one_line(tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    base = _structure_overrides(tiny_model_dir, tiny_text_file, tmp_path / "x")
    for recipe, extra, message in [
        ("prune_depth", "depth.remove=4", "depth.remove=4: the model has 4 layers"),
        ("prune_depth", "depth.remove=3", "depth.remove=3: the model has 4 layers, of which 2 may go"),
        ("prune_depth", "depth.importance=magic", "depth.importance 'magic' is unknown; choose cosine, ppl"),
        ("merge_kv", "merge.kv_heads=3", "merge.kv_heads=3: 4 query heads over 2 KV heads; choose one of 1, 2"),
    ]:
        done = run_train(f"recipe={recipe}", *base, extra, check=False)
        assert done.returncode == 2 and message in done.stderr.strip().splitlines()[-1], done.stderr[-1500:]
