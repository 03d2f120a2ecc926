"""Batched KV-cache generation and the resumable teacher-output store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import distillprune.generate as gen_mod
from distillprune.generate import GenerationStore, generate, stop_ids, teacher_responses
from distillprune.models import load_model, load_tokenizer
from distillprune.prompts import load_prompts


def _prompts(tok, n: int = 5) -> list[list[int]]:
    texts = ["To be, or not", "Thou art", "The king is dead, long live", "Hark", "What light through yonder window"]
    return [tok(t).input_ids for t in texts[:n]]


def test_batched_left_padded_generation_equals_one_by_one(tiny_model_dir: Path) -> None:
    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    prompts = _prompts(tok)
    batched = generate(model, prompts, tok.pad_token_id, tok.eos_token_id, max_new_tokens=6)
    single = [generate(model, [p], tok.pad_token_id, tok.eos_token_id, max_new_tokens=6)[0] for p in prompts]
    no_cache = generate(model, prompts, tok.pad_token_id, tok.eos_token_id, max_new_tokens=6, use_cache=False)
    assert batched == single == no_cache
    assert all(0 < len(r) <= 6 for r in batched)


def test_generation_stops_at_any_of_the_models_eos_ids(tiny_model_dir: Path) -> None:
    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    prompts = _prompts(tok)
    free = generate(model, prompts, tok.pad_token_id, stop_ids(model, tok), max_new_tokens=6)
    second = free[0][1]  # a token the first row produces second, not first (Llama-3 style: several stop ids)
    assert free[0][0] != second
    model.generation_config.eos_token_id = [tok.eos_token_id, second, 7]
    assert stop_ids(model, tok) == [tok.eos_token_id, second, 7]
    stopped = generate(model, prompts, tok.pad_token_id, stop_ids(model, tok), max_new_tokens=6)
    assert stopped[0] == free[0][:2]  # cut right after the second stop id, which it now includes
    for row, full in zip(stopped, free, strict=True):  # every row ends at its first stop id of the three
        cut = next((i for i, t in enumerate(full) if t in (tok.eos_token_id, second, 7)), len(full) - 1)
        assert row == full[: cut + 1]


def _cfg(tmp_path: Path, model_dir: Path, **gen) -> OmegaConf:
    settings = {
        "max_new_tokens": 5,
        "do_sample": False,
        "temperature": 1.0,
        "top_p": 1.0,
        "batch_size": 4,
        "cache_dir": str(tmp_path / "gen"),
    } | gen
    return OmegaConf.create({"seed": 1, "teacher": {"name": str(model_dir), "dtype": "float32"}, "generate": settings})


def test_killed_generation_resumes_without_loss_or_duplicates(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    prompts = load_prompts("packaged", 18, seed=3)
    straight = teacher_responses(model, tok, prompts, _cfg(tmp_path / "a", tiny_model_dir))

    real, calls = gen_mod.generate, []

    def dies_on_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    cfg = _cfg(tmp_path / "b", tiny_model_dir)
    monkeypatch.setattr(gen_mod, "generate", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        teacher_responses(model, tok, prompts, cfg)
    monkeypatch.setattr(gen_mod, "generate", real)
    store = next((tmp_path / "b" / "gen").iterdir()) / "rows.jsonl"
    assert len(store.read_text().splitlines()) == 8  # two whole batches survived
    with store.open("a") as f:
        f.write('{"id": "torn-half-li')  # and a kill in the middle of a write leaves a torn line
    resumed = teacher_responses(model, tok, prompts, cfg)

    ids = [json.loads(line)["id"] for line in store.read_text().splitlines()]
    assert sorted(ids) == sorted(p["id"] for p in prompts)  # nothing lost, nothing twice
    assert {k: v["response_ids"] for k, v in resumed.items()} == {k: v["response_ids"] for k, v in straight.items()}


def test_changed_settings_or_prompts_make_a_new_store(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    prompts = load_prompts("packaged", 4, seed=3)
    teacher_responses(model, tok, prompts, _cfg(tmp_path, tiny_model_dir))
    teacher_responses(model, tok, prompts, _cfg(tmp_path, tiny_model_dir))  # reused: no new folder
    assert len(list((tmp_path / "gen").iterdir())) == 1
    teacher_responses(model, tok, prompts, _cfg(tmp_path, tiny_model_dir, max_new_tokens=3))
    teacher_responses(model, tok, prompts[:3], _cfg(tmp_path, tiny_model_dir))
    stores = list((tmp_path / "gen").iterdir())
    assert len(stores) == 3
    assert all(json.loads((s / "provenance.json").read_text())["teacher"] == str(tiny_model_dir) for s in stores)


def test_store_drops_only_the_torn_tail(tmp_path: Path) -> None:
    store = GenerationStore(tmp_path, {"x": 1})
    store.append([{"id": "a"}, {"id": "b"}])
    with store.path.open("a") as f:
        f.write('{"id": "c", "resp')
    assert GenerationStore(tmp_path, {"x": 1}).done_ids() == {"a", "b"}
