"""The real Gemma-3-270M (packaged GGUF, assembled from its chunk packages): the alias converts, and
``prune_distill`` prunes it over all layers, recovers it with KD from the unpruned model and exports a stock
Gemma 3 folder that plain transformers reloads. Marked slow (about 6 minutes on 2 cores): ``make test-slow``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import run_train
from distillprune.models import load_tokenizer, resolve

pytestmark = pytest.mark.slow


def test_gemma3_alias_prunes_recovers_with_kd_and_reloads(tmp_path: Path) -> None:
    folder = Path(resolve("gemma3-270m"))  # assembled, converted and checked against the GGUF logits once
    config = json.loads((folder / "config.json").read_text())
    assert (config["model_type"], config["num_attention_heads"], config["num_key_value_heads"]) == ("gemma3_text", 4, 1)
    assert (config["head_dim"], config["vocab_size"], config["num_hidden_layers"]) == (256, 262144, 18)
    out = tmp_path / "gemma"
    run_train(
        "recipe=prune_distill", "model.name=gemma3-270m", "prune.layers=all", "prune.ratio=0.1",
        "prune.allocation.method=uniform",  # equal widths in every layer: the stock config
        "prune.calibration.samples=4", "prune.calibration.seq_len=64", "data.seq_len=64", "data.batch_size=2",
        "data.val_batches=2", "trainer.max_steps=6", "trainer.val_check_interval=3", "checkpoint.every_n_steps=3",
        "system.lr=3e-4", "trainer.enable_progress_bar=false", "logger.wandb.mode=disabled",
        "evaluate.zero_shot.tasks=[]", "evaluate.speed.batch_sizes=[1]", "evaluate.speed.repeats=1",
        "evaluate.text.max_tokens=512", f"output_dir={out}", timeout=1800,
    )  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.08 < metrics["params"]["removed_fraction"] < 0.12
    ppl = metrics["val_ppl"]
    assert ppl["recovered"] < ppl["pruned"] and all(v < 1e4 for v in ppl.values()), ppl
    saved = json.loads((out / "final" / "config.json").read_text())
    assert saved["model_type"] == "gemma3_text" and saved["layer_types"] == config["layer_types"]  # stock
    assert config["hidden_size"] % saved["num_attention_heads"] == 0  # the stock config's own check
    final = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    assert sum(p.numel() for p in final.parameters()) == metrics["params"]["pruned"]
    ids = load_tokenizer(str(out / "final"))("To be, or not to be", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(final(ids).logits).all()
