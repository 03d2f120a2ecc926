"""Structured pruning against a dense reference: identity at ratio 0, equality with zeroed structures, GQA modes,
and save -> fresh-process from_pretrained for stock (uniform) and registered (per-layer) configs."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from conftest import make_tiny_model, prune_overrides, run_train
from distillprune.errors import UserError
from distillprune.prune import apply, layer_widths, plan, score, select
from distillprune.prune.groups import head_dim

IDS = torch.randint(0, 300, (4, 24), generator=torch.Generator().manual_seed(0))


def _prune(model, method="taylor", layers=(1, 2), ratio=0.15, gqa="q_per_group", uniform=True, round_to=1):
    scores, peak = score(model, [{"input_ids": IDS}], method, list(layers), "sum")
    keep = select(scores, plan(model, ratio, list(layers), gqa, round_to), layer_widths(model), gqa, uniform, round_to)
    return apply(model, keep), keep, peak


def _zeroed(model, keep):
    """The dense model with every removed head's o_proj columns and removed channel's down_proj column zeroed."""
    ref, hd = copy.deepcopy(model), head_dim(model)
    for i, k in keep.items():
        layer, w = ref.model.layers[i], layer_widths(ref)[i]
        for h in set(range(w.heads)) - set(k["heads"]):
            layer.self_attn.o_proj.weight.data[:, h * hd : (h + 1) * hd] = 0
        layer.mlp.down_proj.weight.data[:, sorted(set(range(w.intermediate)) - set(k["channels"]))] = 0
    return ref


@pytest.fixture()
def model(tiny_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def test_ratio_zero_is_the_identity(model) -> None:
    with torch.no_grad():
        before = model(IDS).logits
    pruned, _, _ = _prune(model, layers=range(4), ratio=0.0)
    assert type(pruned).__name__ == "LlamaForCausalLM"  # widths unchanged: still the stock class
    with torch.no_grad():
        torch.testing.assert_close(pruned(IDS).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["random", "l1", "l2", "taylor", "taylor_vector", "taylor2", "activation"])
@pytest.mark.parametrize("gqa", ["q_per_group", "kv_groups"])
@pytest.mark.parametrize("uniform", [True, False])
def test_pruned_equals_dense_with_removed_structures_zeroed(model, method: str, gqa: str, uniform: bool) -> None:
    dense = copy.deepcopy(model)
    pruned, keep, _ = _prune(model, method=method, gqa=gqa, uniform=uniform)
    with torch.no_grad():
        torch.testing.assert_close(pruned(IDS).logits, _zeroed(dense, keep)(IDS).logits, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in dense.parameters())


def test_gqa_modes_keep_groups_consistent(model) -> None:
    per_group, keep, _ = _prune(copy.deepcopy(model), gqa="q_per_group", ratio=0.15)
    for i, k in keep.items():  # 4 heads, 2 KV groups of 2: one head leaves each group, both KV heads stay
        assert k["kv_heads"] == [0, 1] and len(k["heads"]) == 2
        assert sorted(h // 2 for h in k["heads"]) == [0, 1]
        assert per_group.model.layers[i].self_attn.num_key_value_groups == 1
    groups, keep, _ = _prune(copy.deepcopy(model), gqa="kv_groups", ratio=0.15)
    for i, k in keep.items():  # a whole KV group leaves with both its query heads
        g = k["kv_heads"][0]
        assert len(k["kv_heads"]) == 1 and k["heads"] == [2 * g, 2 * g + 1]
        assert groups.model.layers[i].self_attn.num_key_value_groups == 2
    for m in (per_group, groups):  # the KV cache still lines up
        assert m.generate(IDS[:1, :5], max_new_tokens=4, do_sample=False).shape == (1, 9)


def test_head_dim_is_never_changed(model) -> None:
    hd = head_dim(model)
    pruned, _, _ = _prune(model, layers=range(4), ratio=0.35)
    assert pruned.config.head_dim == hd and pruned.config.num_attention_heads == 2  # 4 -> 2 heads, same head_dim


def test_heads_only_or_channels_only(model) -> None:
    heads_only = plan(model, 0.1, [1, 2], "kv_groups", parts=("heads",))
    assert heads_only.kv_heads == {1: 1, 2: 1} and heads_only.channels == {1: 128, 2: 128}
    channels_only = plan(model, 0.1, [1, 2], "kv_groups", parts=("channels",))
    assert channels_only.kv_heads == {1: 2, 2: 2} and channels_only.heads == {1: 4, 2: 4}
    assert channels_only.channels[1] < 128
    with pytest.raises(UserError, match="cannot be met"):
        plan(model, 0.5, [1], "kv_groups", parts=("heads",))


def test_round_to_and_infeasible_ratio(model) -> None:
    pruned, keep, _ = _prune(model, ratio=0.1, round_to=8)
    assert all(len(k["channels"]) % 8 == 0 for k in keep.values())
    with pytest.raises(UserError, match="cannot be met"):
        plan(model, 0.9, [1], "q_per_group")
    with pytest.raises(UserError, match="prune.gqa"):
        plan(model, 0.1, [1], "half")


def _fresh_process_logits(folder: Path, import_distillprune: bool) -> torch.Tensor:
    out = folder / "logits.pt"
    code = (
        ("import distillprune\n" if import_distillprune else "")
        + "import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}).eval()\n"
        "assert 'distillprune' in sys.modules or not " + str(import_distillprune) + "\n"
        f"ids = torch.load({str(folder / 'ids.pt')!r})\n"
        f"torch.save(m(ids).logits.detach(), {str(out)!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("uniform_all", [True, False])
def test_save_and_load_in_a_fresh_process(model, tmp_path: Path, uniform_all: bool) -> None:
    layers = range(4) if uniform_all else (1, 2)
    pruned, _, _ = _prune(model, layers=layers, uniform=uniform_all)
    folder = tmp_path / "pruned"
    pruned.save_pretrained(folder)
    torch.save(IDS, folder / "ids.pt")
    text = (folder / "config.json").read_text()
    assert ('"model_type": "llama"' in text) == uniform_all
    assert not list(folder.glob("*.bin"))
    with torch.no_grad():
        expected = pruned(IDS).logits
    # a uniform prune is a stock Llama: no distillprune import needed; per-layer needs the registered types
    got = _fresh_process_logits(folder, import_distillprune=not uniform_all)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_qwen2_with_biases_and_mistral_without_gqa(tiny_tokenizer, tmp_path: Path, tied: bool) -> None:
    qwen_dir = make_tiny_model(tmp_path / "qwen2", tiny_tokenizer, arch="qwen2", tie_word_embeddings=tied)
    qwen = AutoModelForCausalLM.from_pretrained(qwen_dir).eval()
    assert qwen.model.layers[0].self_attn.q_proj.bias is not None
    dense = copy.deepcopy(qwen)
    pruned, keep, _ = _prune(qwen, layers=(0, 1, 2), gqa="kv_groups", ratio=0.2)
    with torch.no_grad():
        torch.testing.assert_close(pruned(IDS).logits, _zeroed(dense, keep)(IDS).logits, rtol=1e-5, atol=1e-5)
    pruned.save_pretrained(tmp_path / "q")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, pruned(IDS).logits, rtol=0, atol=0)

    mistral_dir = make_tiny_model(
        tmp_path / "m", tiny_tokenizer, arch="mistral", num_key_value_heads=4, tie_word_embeddings=tied
    )
    mistral = AutoModelForCausalLM.from_pretrained(mistral_dir).eval()  # no GQA: 4 heads, 4 KV heads
    assert type(mistral).__name__ == "MistralForCausalLM"
    dense = copy.deepcopy(mistral)
    pruned, keep, _ = _prune(mistral, gqa="kv_groups", ratio=0.1)
    with torch.no_grad():
        torch.testing.assert_close(pruned(IDS).logits, _zeroed(dense, keep)(IDS).logits, rtol=1e-5, atol=1e-5)


def test_unsupported_architecture_names_the_supported_ones() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    supported = "gemma3_text, llama, mistral, phi3, qwen2, qwen3"
    with pytest.raises(UserError, match=f"pruning supports {supported}; 'gpt2' has no adapter"):
        plan(gpt2, 0.1, [0], "q_per_group")


def test_gradient_scores_report_peak_memory(model) -> None:
    _, _, peak = _prune(model, method="taylor")
    assert peak > 0
    assert all(p.grad is None for p in model.parameters())  # nothing left behind


@pytest.fixture(scope="session")
def tiny_family_dirs(tmp_path_factory, tiny_tokenizer, tiny_model_dir: Path) -> dict[str, Path]:
    """Llama with GQA and tied embeddings, Llama without GQA and untied, Qwen2 with q/k/v biases."""
    root = tmp_path_factory.mktemp("families")
    return {
        "llama_gqa_tied": tiny_model_dir,
        "llama_mha_untied": make_tiny_model(root / "mha", tiny_tokenizer, num_key_value_heads=4,
                                            tie_word_embeddings=False),
        "qwen2_bias_untied": make_tiny_model(root / "qwen2", tiny_tokenizer, arch="qwen2", tie_word_embeddings=False),
    }  # fmt: skip


@pytest.mark.parametrize("family", ["llama_gqa_tied", "llama_mha_untied", "qwen2_bias_untied"])
@pytest.mark.parametrize("recipe", ["prune_lora", "prune_distill"])
def test_prune_recipe_end_to_end(
    recipe: str, family: str, tiny_family_dirs: dict[str, Path], tiny_text_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / recipe
    run_train(f"recipe={recipe}", *prune_overrides(tiny_family_dirs[family], tiny_text_file, out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert abs(metrics["params"]["removed_fraction"] - 0.2) < 0.01  # prune.ratio=0.2 of all parameters
    assert set(metrics["val_ppl"]) == {"dense", "pruned", "recovered"}
    assert set(metrics["tokens_per_s"]) == {"dense", "pruned"} and metrics["peak_mem_mb"] > 0
    heads, channels = [w["heads"] for w in metrics["widths"]], [w["intermediate"] for w in metrics["widths"]]
    assert heads[0] == heads[3] == 4 and channels[0] == channels[3]  # layers 1 and 2 pruned, 0 and 3 kept
    assert min(heads[1:3]) < 4 and max(channels[1:3]) < channels[0]
    shares = metrics["layer_shares"]  # the default sensitivity allocation, capped where a layer cannot give 1.5x
    assert sorted(shares) == ["1", "2"] and sum(shares.values()) == pytest.approx(2.0, abs=1e-3)
    final = AutoModelForCausalLM.from_pretrained(out / "final").eval()  # registered per-layer type
    assert type(final).__name__.startswith("Distillprune")
    assert not any("lora" in name for name, _ in final.named_parameters())  # adapters merged away
    assert sum(p.numel() for p in final.parameters()) == metrics["params"]["pruned"]
    with torch.no_grad():
        assert torch.isfinite(final(IDS).logits).all()
    evaluation = metrics["evaluation"]["models"]  # dense beside pruned beside recovered
    assert list(evaluation) == ["dense", "pruned", "recovered"]
    assert evaluation["pruned"]["params"] == evaluation["recovered"]["params"] == metrics["params"]["pruned"]
    assert evaluation["pruned"]["flops_per_token"] < evaluation["dense"]["flops_per_token"]
    assert (out / "report" / "layer_widths.png").is_file() and "| recovered |" in (out / "report.md").read_text()


@pytest.mark.parametrize("ranked", [False, True])
def test_uniform_allocation_plans_every_layer_alike_and_ranks_channels_when_asked(
    ranked: bool, tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    """The branch the default (sensitivity) does not take: uniform widths, or channels ranked across layers."""
    out = tmp_path / "run"
    extra = ["prune.allocation.method=uniform", f"prune.uniform={str(not ranked).lower()}", "trainer.max_steps=0"]
    run_train("recipe=prune_lora", *prune_overrides(tiny_model_dir, tiny_text_file, out), *extra)
    metrics = json.loads((out / "metrics.json").read_text())
    assert "layer_shares" not in metrics and "layer_sensitivity" not in metrics  # no sensitivity pass
    assert abs(metrics["params"]["removed_fraction"] - 0.2) < 0.01
    widths = metrics["widths"]
    assert widths[1]["heads"] == widths[2]["heads"] < widths[0]["heads"]  # heads are planned alike either way
    channels = [w["intermediate"] for w in widths[1:3]]
    assert (channels[0] != channels[1]) if ranked else (channels[0] == channels[1])


@pytest.mark.parametrize("recipe", ["prune_lora", "prune_distill"])
def test_the_dense_control_is_the_dense_model_through_the_same_recovery(
    recipe: str, tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    out, zero = tmp_path / "control", tmp_path / "ratio0"
    run_train(f"recipe={recipe}", *prune_overrides(tiny_model_dir, tiny_text_file, out), "control=true")
    run_train(f"recipe={recipe}", *prune_overrides(tiny_model_dir, tiny_text_file, zero), "prune.ratio=0")
    metrics, reference = (json.loads((d / "metrics.json").read_text()) for d in (out, zero))
    assert list(metrics["evaluation"]["models"]) == ["dense", "pruned", "control", "recovered"]
    val = metrics["val_ppl"]
    assert val["control"] != val["dense"]  # trained: not the dense model itself
    # the control is what prune.ratio=0 recovers, on the same validation and evaluation text
    assert val["control"] == pytest.approx(reference["val_ppl"]["recovered"], rel=1e-4)
    ppl = {k: v["perplexity"]["ppl"] for k, v in metrics["evaluation"]["models"].items()}
    assert ppl["control"] == pytest.approx(
        reference["evaluation"]["models"]["recovered"]["perplexity"]["ppl"], rel=1e-4
    )
    fair = metrics["fair_ratio"]
    assert fair["val_ppl"] == pytest.approx(val["recovered"] / val["control"], abs=1e-3)
    assert fair["eval_ppl"] == pytest.approx(ppl["recovered"] / ppl["control"], abs=1e-3)
    assert (out / "control" / "checkpoints").is_dir() and "fair_ratio:" in (out / "report.md").read_text()


def test_prune_sweep_reports_ppl_and_speed_per_ratio(tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path):
    out = tmp_path / "sweep"
    args = prune_overrides(tiny_model_dir, tiny_text_file, out)
    run_train("recipe=prune_lora", *args, "prune.sweep=[0.3,0.1,0.2]", "trainer.max_steps=0")
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["sweep"]
    assert [r["ratio"] for r in rows] == [0.0, 0.1, 0.2, 0.3]
    assert [r["params"] for r in rows] == sorted((r["params"] for r in rows), reverse=True)
    assert all(abs(r["removed_fraction"] - r["ratio"]) < 0.02 and r["tokens_per_s"] > 0 for r in rows)
    # the sweep reuses the recipe's scores: its 0.2 point is the model the recipe pruned
    assert rows[2]["params"] == metrics["params"]["pruned"] and rows[2]["ppl"] == metrics["val_ppl"]["pruned"]
    assert rows[0]["ppl"] == metrics["val_ppl"]["dense"]
    assert (out / "report" / "pruning_sweep.png").is_file() and "pruning sweep" in (out / "report.md").read_text()


def test_prune_bad_input_is_one_line(tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    base = prune_overrides(tiny_model_dir, tiny_text_file, tmp_path / "x")
    for extra, message in [
        ("prune.ratio=0.95", "cannot be met"),
        ("prune.importance=magic", "prune.importance 'magic' is unknown"),
        ("prune.layers=0,9", "prune.layers must be indices in [0, 3]"),
    ]:
        done = run_train("recipe=prune_lora", *base, extra, check=False)
        assert done.returncode == 2 and message in done.stderr.strip().splitlines()[-1], done.stderr[-1500:]


def test_magnitude_masks_stay_fixed_through_training(model) -> None:
    from distillprune.prune.magnitude import finalize, magnitude_prune, sparsity_of

    reached = magnitude_prune(model, 0.5, [1, 2])
    assert abs(reached - 0.5) < 0.01
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(3):
        model(IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    finalize(model)
    assert sparsity_of(model, [1, 2]) >= reached  # nothing that was pruned came back
    assert sparsity_of(model, [0, 3]) < 0.01  # layers not asked for are untouched
    assert not any(name.endswith(("weight_orig", "weight_mask")) for name, _ in model.named_parameters())


def test_prune_magnitude_end_to_end(tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "magnitude"
    args = [a for a in prune_overrides(tiny_model_dir, tiny_text_file, out) if not a.startswith("prune.calibration")]
    run_train("recipe=prune_magnitude", *args, "control=true")  # the recipe's default: its dense control
    metrics = json.loads((out / "metrics.json").read_text())
    assert abs(metrics["sparsity"] - 0.5) < 0.01 and metrics["sparsity_after_recovery"] >= metrics["sparsity"]
    assert set(metrics["val_ppl"]) == {"dense", "pruned", "control", "recovered"} and metrics["fair_ratio"]["val_ppl"]
    assert metrics["params"]["pruned"] == metrics["params"]["dense"] and "none" in metrics["speedup"]
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert (final.model.layers[1].mlp.up_proj.weight == 0).float().mean() > 0.3
