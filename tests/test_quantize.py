"""Quantization against its formulas: round-to-nearest grids on known tensors and a per-block loop, exact round
trips through compressed-tensors folders, GGUF files read back by transformers (and run by llama.cpp where it is
installed), llama vs deci for per-layer widths, and the quantize recipe end to end on its own settings."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import make_tiny_model, prune_overrides, run_train, tiny_overrides
from distillprune.errors import UserError
from distillprune.evaluation import llamacpp
from distillprune.prune import apply
from distillprune.quant.gguf import export_gguf
from distillprune.quant.model import (
    end_fake_quantized,
    load_compressed,
    quantize_model,
    save_compressed,
    stored_bytes,
    train_fake_quantized,
)
from distillprune.quant.rtn import fake_quantize, quantize
from distillprune.quant.settings import LLAMA_CPP_TYPES, Scheme, check_type

IDS = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(0))
needs_llama_cpp = pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python is not installed")


def test_known_tensors_land_on_the_grid_the_formulas_give() -> None:
    # symmetric int4, one scale: max|w| = 7 -> scale 1; halves round to even (2.5 -> 2, 3.5 -> 4)
    q = quantize(torch.tensor([[-7.0, 0.0, 2.5, 3.5, 7.0]]), Scheme(4, True, "tensor"))
    assert q.q.tolist() == [[-7, 0, 2, 4, 7]] and q.scale.tolist() == [[1.0]]
    torch.testing.assert_close(q.dequantize(), torch.tensor([[-7.0, 0.0, 2.0, 4.0, 7.0]]))
    # per channel: each row its own scale (max|row| / 127 for int8)
    q = quantize(torch.tensor([[127.0, -63.5], [-254.0, 1.0]]), Scheme(8, True, "channel"))
    assert q.scale.tolist() == [[1.0], [2.0]] and q.q.tolist() == [[127, -64], [-127, 0]]
    # asymmetric 2-bit: [-1, 2] -> scale 1, zero 1, integers 0..3, an exact round trip
    q = quantize(torch.tensor([[-1.0, 0.0, 1.0, 2.0]]), Scheme(2, False, "tensor"))
    assert (q.q.tolist(), q.zero.tolist(), q.scale.tolist()) == ([[0, 1, 2, 3]], [[1]], [[1.0]])
    torch.testing.assert_close(q.dequantize(), torch.tensor([[-1.0, 0.0, 1.0, 2.0]]))
    # all positive: 0 stays representable (lo = min(w, 0)), so zero = 0, scale = 6 / 3 = 2, 1.5 -> 2
    q = quantize(torch.tensor([[3.0, 6.0]]), Scheme(2, False, "tensor"))
    assert (q.q.tolist(), q.zero.tolist()) == ([[2, 3]], [[0]])
    # a block of zeros gets scale 1 and comes back as zeros
    q = quantize(torch.zeros(2, 4), Scheme(8, True, "channel"))
    assert q.scale.tolist() == [[1.0], [1.0]] and not q.dequantize().any()


def _loop_reference(w: torch.Tensor, bits: int, symmetric: bool, block: int) -> torch.Tensor:
    """Dense reference: each block of ``block`` consecutive inputs of a row, quantized one at a time."""
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for c in range(0, w.shape[1], block):
            x = w[r, c : c + block].double()
            if symmetric:
                scale = x.abs().max() / (2 ** (bits - 1) - 1)
                qs = torch.clamp(torch.round(x / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
                out[r, c : c + block] = (qs * scale).float()
            else:
                lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
                scale = (hi - lo) / (2**bits - 1)
                zero = torch.clamp(torch.round(-lo / scale), 0, 2**bits - 1)
                qs = torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)
                out[r, c : c + block] = ((qs - zero) * scale).float()
    return out


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
def test_every_granularity_equals_a_per_block_loop(bits: int, symmetric: bool) -> None:
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(bits))
    for scheme, block in (
        (Scheme(bits, symmetric, "channel"), 64),
        (Scheme(bits, symmetric, "group", 16), 16),
    ):
        torch.testing.assert_close(quantize(w, scheme).dequantize(), _loop_reference(w, bits, symmetric, block))
    flat = _loop_reference(w.reshape(1, -1), bits, symmetric, w.numel()).reshape(w.shape)
    torch.testing.assert_close(quantize(w, Scheme(bits, symmetric, "tensor")).dequantize(), flat)


@pytest.mark.parametrize(
    "scheme", [Scheme(4, True, "group", 8), Scheme(4, False, "group", 8), Scheme(8, True, "channel")]
)
def test_weights_already_on_the_grid_come_back_exactly(scheme: Scheme) -> None:
    first = quantize(torch.randn(4, 32, generator=torch.Generator().manual_seed(1)), scheme)
    once = first.dequantize()
    twice = quantize(once, scheme)
    assert torch.equal(twice.q, first.q) and torch.equal(twice.zero, first.zero)  # the same integers
    torch.testing.assert_close(twice.dequantize(), once, rtol=0, atol=1e-6)  # scales equal to float rounding
    assert twice.q.min() >= scheme.levels()[0] and twice.q.max() <= scheme.levels()[1]


def test_fake_quantize_rounds_forward_and_passes_the_gradient_through() -> None:
    w = torch.randn(4, 32, requires_grad=True)
    scheme = Scheme(4, True, "group", 16)
    out = fake_quantize(w, scheme)
    torch.testing.assert_close(out, quantize(w, scheme).dequantize())
    (out * torch.arange(32.0)).sum().backward()
    torch.testing.assert_close(w.grad, torch.arange(32.0).expand(4, 32))


def test_bad_schemes_are_one_line_errors() -> None:
    with pytest.raises(UserError, match=r"group_size=48 does not divide the input width 64 of proj.*\[32, 64\]"):
        quantize(torch.zeros(2, 64), Scheme(4, True, "group", 48), "proj")
    with pytest.raises(UserError, match="bits=16 is not supported"):
        Scheme(16)
    with pytest.raises(UserError, match="unknown key.*'bit'.*bits, symmetric"):
        Scheme.of({"bit": 4})
    with pytest.raises(UserError, match="granularity='row'"):
        Scheme(4, True, "row")


@pytest.mark.parametrize(
    "scheme", [Scheme(4, True, "group", 32), Scheme(4, False, "group", 32), Scheme(8, False, "channel")]
)
def test_a_compressed_tensors_folder_loads_back_to_the_same_weights(
    tiny_model_dir: Path, tmp_path: Path, scheme: Scheme
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    dense = copy.deepcopy(model.state_dict())
    grids = quantize_model(model, scheme)
    assert "lm_head" not in grids and len(grids) == 4 * 7  # q k v o gate up down in each of 4 layers
    assert not torch.equal(
        model.state_dict()["model.layers.0.mlp.up_proj.weight"], dense["model.layers.0.mlp.up_proj.weight"]
    )
    folder = save_compressed(model, AutoTokenizer.from_pretrained(tiny_model_dir), grids, scheme, tmp_path / "q")
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == scheme.bits
    loaded = load_compressed(folder)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    file = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert file < 0.45 * sum(t.numel() * 4 for t in dense.values())  # against fp32 (embeddings stay fp32)
    assert stored_bytes(model, grids) == pytest.approx(file, rel=0.08)  # file = our count + headers and shapes


def test_gguf_files_load_in_transformers_as_the_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ref = model(IDS).logits
    for qtype, atol in (("F32", 1e-5), ("F16", 0.05)):
        info = export_gguf(model, tok, tmp_path / f"m-{qtype}.gguf", qtype)
        assert info["architecture"] == "llama"
        back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f"m-{qtype}.gguf", dtype=torch.float32)
        torch.testing.assert_close(back(IDS).logits, ref, rtol=0, atol=atol)
    # Q8_0 is symmetric int8 in 32-wide blocks with an fp16 scale: our int8-g32 grid (scales rounded to fp16)
    info = export_gguf(model, tok, tmp_path / "m-Q8_0.gguf", "Q8_0")
    assert info["tensor_types"] == {"F32": 9, "Q8_0": 29}  # norms F32; embedding and every projection Q8_0
    ours = copy.deepcopy(model)
    with torch.no_grad():
        for p in ours.parameters():
            if p.ndim == 2:
                q = quantize(p, Scheme(8, True, "group", 32))
                q.scale = q.scale.half().float()
                p.copy_(q.dequantize())
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m-Q8_0.gguf", dtype=torch.float32)
    torch.testing.assert_close(back(IDS).logits, ours(IDS).logits, rtol=0, atol=1e-4)
    # 4-bit: the token embedding (also the tied output layer) stays Q8_0
    assert export_gguf(model, tok, tmp_path / "m-Q4_0.gguf", "Q4_0")["tensor_types"] == {
        "F32": 9,
        "Q4_0": 28,
        "Q8_0": 1,
    }


def test_an_untied_output_layer_is_written_as_its_own_tensor(tiny_tokenizer, tmp_path: Path) -> None:
    folder = make_tiny_model(tmp_path / "untied", tiny_tokenizer, tie_word_embeddings=False, seed=3)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    info = export_gguf(model, tiny_tokenizer, tmp_path / "u.gguf", "F32")
    assert sum(info["tensor_types"].values()) == 39  # token_embd, 4 x 9 per layer, output_norm, output
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="u.gguf", dtype=torch.float32)
    torch.testing.assert_close(back(IDS).logits, model(IDS).logits, rtol=0, atol=1e-5)


def _per_layer_pruned(tiny_model_dir: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    keep = {  # 4 heads / 2 KV heads / 128 channels -> different widths in layers 1 and 2
        1: {"heads": [0, 1], "kv_heads": [0], "channels": list(range(0, 128, 2))},
        2: {"heads": [0, 1, 2, 3], "kv_heads": [0, 1], "channels": list(range(96))},
    }
    return apply(model, keep)


def test_per_layer_widths_are_written_as_deci_with_per_layer_arrays(tiny_model_dir: Path, tmp_path: Path) -> None:
    from gguf import GGUFReader

    model = _per_layer_pruned(tiny_model_dir)
    info = export_gguf(model, AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path / "p.gguf", "Q8_0")
    assert info["architecture"] == "deci"
    reader = GGUFReader(tmp_path / "p.gguf")
    arrays = {
        k: reader.fields[f"deci.{k}"].contents()
        for k in ("attention.head_count", "attention.head_count_kv", "feed_forward_length")
    }
    assert arrays == {
        "attention.head_count": [4, 2, 4, 4],
        "attention.head_count_kv": [2, 1, 2, 2],
        "feed_forward_length": [128, 64, 96, 128],
    }
    assert reader.fields["deci.attention.key_length"].contents() == 16
    shapes = {t.name: [int(x) for x in t.shape] for t in reader.tensors}  # GGUF shapes are [in, out]
    assert shapes["blk.1.attn_q.weight"] == [64, 32] and shapes["blk.1.ffn_down.weight"] == [64, 64]
    assert shapes["blk.2.ffn_gate.weight"] == [64, 96] and shapes["blk.0.attn_k.weight"] == [64, 32]


def test_gguf_export_refuses_what_it_cannot_write(tiny_model_dir: Path, tiny_tokenizer, tmp_path: Path) -> None:
    qwen = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "qwen2", tiny_tokenizer, arch="qwen2"))
    with pytest.raises(UserError, match="GGUF export knows the Llama family.*'qwen2' is not one of them"):
        export_gguf(qwen, tiny_tokenizer, tmp_path / "q.gguf", "F16")
    with pytest.raises(UserError, match="unknown GGUF type 'Q3_X'; types: F32, F16"):
        check_type("Q3_X")
    if not llamacpp.available():
        with pytest.raises(UserError, match="Q4_K_M needs llama.cpp's quantizer.*without it: F32, F16"):
            check_type("Q4_K_M")
    assert not (tmp_path / "q.gguf").exists()


@needs_llama_cpp
def test_llama_cpp_runs_the_files_as_the_hf_model_does(tiny_model_dir: Path, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for name, model in (
        ("uniform", AutoModelForCausalLM.from_pretrained(tiny_model_dir)),
        ("deci", _per_layer_pruned(tiny_model_dir)),
    ):
        prompt = IDS[0, :12].tolist()
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, 12:].tolist()
        f16 = llamacpp.LlamaCpp(Path(export_gguf(model, tok, tmp_path / f"{name}-F16.gguf", "F16")["file"]), 64)
        assert f16.greedy(prompt, 8) == hf, name
        ref = model(IDS).logits
        torch.testing.assert_close(f16.logits(IDS), ref, rtol=0, atol=0.05)
        q8 = llamacpp.LlamaCpp(Path(export_gguf(model, tok, tmp_path / f"{name}-Q8_0.gguf", "Q8_0")["file"]), 64)
        assert (q8.logits(IDS) - ref).abs().max() < 0.15 * ref.abs().max()
    k = export_gguf(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), tok, tmp_path / "k.gguf", sorted(LLAMA_CPP_TYPES)[0]
    )
    assert sum(k["tensor_types"].values()) == 38  # rows of 64 are no multiple of 256: every K-quant falls back


def test_quantize_recipe_end_to_end(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    run_train(
        "recipe=quantize",
        f"model.name={tiny_model_dir}",
        f"output_dir={out}",
        "evaluate.text.max_tokens=256",
        "evaluate.text.context=32",
        "evaluate.text.stride=16",
        "evaluate.speed.repeats=1",
        "evaluate.zero_shot.n=6",
        "evaluate.speed.prompt_tokens=8",
        "evaluate.speed.new_tokens=4",
        "logger.wandb.mode=disabled",
    )
    metrics = json.loads((out / "metrics.json").read_text())
    table = metrics["quantization"]
    assert list(table) == ["float32", "bfloat16", "int8-channel", "int4-channel", "int4-g64", "int4-g32",
                           "int4-g64-gptq", "int4-g64-awq", "gguf-F16", "gguf-Q8_0", "gguf-Q4_0"]  # fmt: skip
    for method in ("gptq", "awq"):  # calibrated on the training split's windows, measured as loaded back
        row = table[f"int4-g64-{method}"]
        assert row["calibration"] == {"source": "shakespeare", "windows": 64, "seq_len": 256}
        assert row["file_bytes"] == pytest.approx(table["int4-g64"]["file_bytes"], rel=0.02)
        assert np.isfinite(metrics["evaluation"]["models"][f"int4-g64-{method}"]["perplexity"]["ppl"])
    ppl = {k: v["perplexity"]["ppl"] for k, v in metrics["evaluation"]["models"].items()}
    assert ppl["bfloat16"] == pytest.approx(ppl["float32"], rel=0.02)
    assert table["int4-g32"]["file_bytes"] < table["int8-channel"]["file_bytes"] < table["bfloat16"]["file_bytes"]
    errors = [table[k]["weight_rel_error"] for k in ("int8-channel", "int4-g32", "int4-g64", "int4-channel")]
    assert errors == sorted(errors)  # finer grids, smaller errors
    again = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    quantize_model(again, Scheme(4, True, "group", 32))
    torch.testing.assert_close(load_compressed(Path(table["int4-g32"]["folder"]))(IDS).logits, again(IDS).logits)
    assert metrics["source"]["packaged_teacher"] is False
    assert metrics["auto"]["gguf_llama_cpp"]["choice"] == ("measure" if llamacpp.available() else "skip")
    report = (out / "report.md").read_text()
    assert "## quantization" in report and "| int4-g32 (compressed-tensors) |" in report
    assert (out / "report" / "quantization.png").stat().st_size > 1000 and "## perplexity against size" in report
    assert np.isfinite(ppl["int4-g32"])


def test_compress_recipe_end_to_end(tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    # prune -> KD recovery -> quantize on the recipe's own quantize settings (MLP channels only: the tiny model's
    # 16-wide heads would leave o_proj inputs that 64-wide groups do not tile; SmolLM2's heads are 64 wide)
    out = tmp_path / "compress"
    run_train("recipe=compress", *prune_overrides(tiny_model_dir, tiny_text_file, out), "prune.parts=[channels]")
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(w["intermediate"] % 64 == 0 for w in metrics["widths"])  # prune.round_to=64
    assert list(metrics["evaluation"]["models"]) == [
        "dense", "pruned", "recovered", "bfloat16", "int8-channel", "int4-channel", "int4-g64", "int4-g32",
        "int4-g64-gptq", "int4-g64-awq",
    ]  # fmt: skip
    table = metrics["quantization"]
    assert list(table)[0] == "recovered" and table["gguf-Q4_0"]["architecture"] == "deci"  # layers 0, 3 unpruned
    recovered = AutoModelForCausalLM.from_pretrained(out / "final")
    quantize_model(recovered, Scheme(8, True, "channel"))
    torch.testing.assert_close(load_compressed(out / "quantized" / "int8-channel")(IDS).logits, recovered(IDS).logits)
    assert "## quantization" in (out / "report.md").read_text()


def test_fake_quantized_training_runs_on_the_grid_and_leaves_float_weights(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    dense = copy.deepcopy(model)
    scheme = Scheme(4, True, "group", 32)
    assert train_fake_quantized(model, scheme) == 28
    on_grid = copy.deepcopy(dense)
    quantize_model(on_grid, scheme)
    torch.testing.assert_close(model(IDS).logits, on_grid(IDS).logits)  # the forward sees the grid
    model(IDS, labels=IDS).loss.backward()
    up = model.model.layers[0].mlp.up_proj
    assert up.parametrizations.weight.original.grad.abs().sum() > 0  # the float weights learn (straight through)
    end_fake_quantized(model)
    assert not any("parametrizations" in k for k in model.state_dict())
    torch.testing.assert_close(
        model.state_dict()["model.layers.0.mlp.up_proj.weight"], dense.state_dict()["model.layers.0.mlp.up_proj.weight"]
    )


def test_quantization_aware_distillation_exports_the_weights_its_int4_copy_was_trained_as(
    tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    scheme = "{bits: 4, symmetric: true, granularity: group, group_size: 32}"
    ppl = {}
    for name, extra in (("plain", []), ("aware", [f"quantize.aware={scheme}"])):
        out = tmp_path / name
        run_train("recipe=logit_distill", *tiny_overrides(tiny_model_dir, tiny_text_file, out, steps=30),
                  "system.lr=3e-3", "trainer.val_check_interval=10", "checkpoint.every_n_steps=10",
                  f"quantize.schemes=[{scheme}]", *extra)  # fmt: skip
        metrics = json.loads((out / "metrics.json").read_text())
        ppl[name] = {k: v["perplexity"]["ppl"] for k, v in metrics["evaluation"]["models"].items()}
        final = AutoModelForCausalLM.from_pretrained(out / "final")  # plain float weights, no parametrization
        quantize_model(final, Scheme(4, True, "group", 32))
        torch.testing.assert_close(load_compressed(out / "quantized" / "int4-g32")(IDS).logits, final(IDS).logits)
    # trained on the grid, the aware student's INT4 copy is the model the training optimised: its float weights
    # alone are not (on random tiny models neither PPL means much; benchmarks/qad.py compares them on SmolLM2)
    assert ppl["aware"]["int4-g32"] != ppl["aware"]["student"] and ppl["plain"]["student"] != ppl["aware"]["student"]
    with pytest.raises(AssertionError, match="quantize.aware trains the whole model"):
        run_train("recipe=prune_lora", *prune_overrides(tiny_model_dir, tiny_text_file, tmp_path / "lora"),
                  f"quantize.aware={scheme}")  # fmt: skip


def test_the_llama_cpp_setting_is_checked_with_the_rest_of_the_block() -> None:
    from omegaconf import OmegaConf

    from distillprune.quant.settings import check_block

    block = lambda run: OmegaConf.create({"schemes": [], "gguf": {"types": ["F16"], "llama_cpp": run}})
    for run in ("auto", False):
        check_block(block(run), {}, {})
    with pytest.raises(UserError, match="quantize.gguf.llama_cpp='maybe'; choose auto, true or false"):
        check_block(block("maybe"), {}, {})
    if llamacpp.available():
        check_block(block(True), {}, {})
    else:
        with pytest.raises(UserError, match="llama_cpp=true needs llama-cpp-python"):
            check_block(block(True), {}, {})
