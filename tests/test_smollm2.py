"""The real packaged teacher: GGUF -> cached safetensors conversion, and a sane perplexity on Shakespeare."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from distillprune.data import load_documents
from distillprune.models import load_model, load_tokenizer, resolve


def test_smollm2_alias_converts_caches_and_reads_shakespeare(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DISTILLPRUNE_CACHE", str(tmp_path))  # a fresh cache: the conversion itself runs here
    folder = Path(resolve("smollm2-135m"))  # converts, and checks cached logits == GGUF logits
    assert folder == tmp_path / "models" / "smollm2-135m"
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()

    model, tok = load_model("smollm2-135m").eval(), load_tokenizer("smollm2-135m")
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (
        30,
        9,
        3,
        49152,
    )
    assert resolve("smollm2-135m") == str(folder)  # second time: straight from the cache

    hamlet = dict(load_documents("shakespeare"))["hamlet_gut"]
    start = hamlet.index("To be, or not to be")
    ids = tok(hamlet[start : start + 3000], return_tensors="pt").input_ids[:, :512]  # [1, 512]
    with torch.no_grad():
        ppl = math.exp(model(ids, labels=ids).loss.item())
    assert 5 < ppl < 120, f"perplexity {ppl:.1f} on Hamlet is not what a working 135M model gives"

    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
