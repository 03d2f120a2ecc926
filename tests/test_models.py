"""Model loading, layer-drop students, vocabularies, attention choice and export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model
from distillprune.errors import UserError
from distillprune.models import (
    drop_layers,
    export,
    load_model,
    load_student,
    load_tokenizer,
    resolve,
    shared_vocab_size,
)


def _ids(n: int = 12) -> torch.Tensor:
    return torch.arange(3, 3 + n).unsqueeze(0)  # [1, T]


def test_keeping_every_layer_is_the_same_model(tiny_model_dir: Path) -> None:
    teacher = load_model(str(tiny_model_dir)).eval()
    same = drop_layers(teacher, [0, 1, 2, 3]).eval()
    torch.testing.assert_close(same(_ids()).logits, teacher(_ids()).logits, rtol=0, atol=0)


def test_layer_drop_copies_the_kept_layers(tiny_model_dir: Path) -> None:
    teacher = load_model(str(tiny_model_dir))
    student = load_student(str(tiny_model_dir), init="layer_drop", keep_layers=[0, 3])
    assert student.config.num_hidden_layers == 2
    t, s = teacher.state_dict(), student.state_dict()
    for key in s:
        src = key.replace("layers.1.", "layers.3.")
        torch.testing.assert_close(s[key], t[src], rtol=0, atol=0)
    # the layer-dropped student keeps the KV cache working (layer indices are renumbered)
    out = student.generate(_ids(4), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
    with pytest.raises(UserError, match="distinct layer indices"):
        load_student(str(tiny_model_dir), init="layer_drop", keep_layers=[0, 9])


def test_student_from_config_is_fresh(tiny_model_dir: Path) -> None:
    student = load_student(str(tiny_model_dir), init="config", config_overrides={"num_hidden_layers": 1})
    teacher = load_model(str(tiny_model_dir))
    assert student.config.num_hidden_layers == 1
    assert not torch.equal(student.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight)
    with pytest.raises(UserError, match="has no field 'hidden_sizes'"):
        load_student(str(tiny_model_dir), init="config", config_overrides={"hidden_sizes": 3})
    with pytest.raises(UserError, match="unknown"):
        load_student(str(tiny_model_dir), init="magic")


def test_model_names(tmp_path: Path) -> None:
    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"  # hub id
    with pytest.raises(UserError, match="unknown model 'not a model'"):
        resolve("not a model")
    with pytest.raises(UserError, match="has no config.json"):
        resolve(str(tmp_path))
    with pytest.raises(UserError, match="could not load 'nobody-xyz/none' from the hub"):
        load_model("nobody-xyz/none")


def test_vocab_padding_is_aligned_and_real_mismatch_fails(tiny_model_dir: Path, tiny_tokenizer, tmp_path: Path) -> None:
    padded_dir = make_tiny_model(tmp_path / "padded", tiny_tokenizer, vocab_pad=16)
    tok = load_tokenizer(str(tiny_model_dir))
    teacher, padded = load_model(str(tiny_model_dir)), load_model(str(padded_dir))
    assert shared_vocab_size(teacher, teacher, tok, tok) is None
    assert shared_vocab_size(padded, teacher, tok, tok) == len(tok)
    other = load_tokenizer(str(tiny_model_dir))
    other.add_tokens(["<extra_token>"])
    with pytest.raises(UserError, match="tokenizers differ"):
        shared_vocab_size(teacher, teacher, tok, other)


def test_export_loads_with_stock_from_pretrained(tiny_model_dir: Path, tmp_path: Path) -> None:
    student = load_student(str(tiny_model_dir), init="layer_drop", keep_layers=[1, 2]).eval()
    out = export(student, load_tokenizer(str(tiny_model_dir)), tmp_path / "final")
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in out.iterdir()
    }
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(loaded(_ids()).logits, student(_ids()).logits, rtol=0, atol=0)
    export(student, load_tokenizer(str(tiny_model_dir)), out)  # a second export replaces the first
    assert not (tmp_path / "final.tmp").exists() and not (tmp_path / "final.old").exists()
