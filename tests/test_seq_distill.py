"""Sequence-level distillation: prompt sets, agreement metrics, and the recipe end to end (with on-policy GKD)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_train, seq_overrides
from distillprune.errors import UserError
from distillprune.evaluation.metrics import rouge_l, token_match
from distillprune.prompts import load_prompts


def test_seq_distill_end_to_end(tiny_model_dir: Path, tmp_path: Path) -> None:
    out, cache = tmp_path / "run", tmp_path / "gen"
    run_train("recipe=seq_distill", *seq_overrides(tiny_model_dir, out, cache))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["prompts"] == {"train": 32, "eval": 8} and metrics["steps"] == 6
    agreement = metrics["teacher_agreement"]
    assert set(agreement) == {"before", "after", "reference_student"}
    assert all(0 <= v["rouge_l"] <= 1 and 0 <= v["token_match"] <= 1 for v in agreement.values())
    assert (out / "final" / "model.safetensors").is_file()
    rows = (out / "data" / "train.jsonl").read_text().splitlines()
    assert len(rows) == 32 and {"prompt", "response"} <= set(json.loads(rows[0]))
    store = next(cache.iterdir())
    assert len((store / "rows.jsonl").read_text().splitlines()) == 40

    # a second run reuses the stored generations; on-policy (lmbda=1) and KD on the responses also run
    again = tmp_path / "again"
    done = run_train(
        "recipe=seq_distill",
        *seq_overrides(tiny_model_dir, again, cache),
        "system.lmbda=1.0",
        "system.kd_weight=0.5",
        "system.max_new_tokens=4",
        "reference_student=false",
    )
    assert "40 of 40 stored" in done.stderr
    assert list(cache.iterdir()) == [store]
    logged = (again / "logs" / "metrics.csv").read_text()
    assert "train/on_policy" in logged and "train/kd" in logged
    assert set(json.loads((again / "metrics.json").read_text())["teacher_agreement"]) == {"before", "after"}


def test_only_the_generate_stage(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "gen-only"
    run_train("recipe=seq_distill", *seq_overrides(tiny_model_dir, out, tmp_path / "gen"), "stages=[generate]")
    metrics = json.loads((out / "metrics.json").read_text())
    assert "steps" not in metrics and "generate_s" in metrics and not (out / "final").exists()


def test_packaged_prompts_have_references_and_are_deterministic() -> None:
    rows = load_prompts("packaged", 30, seed=5)
    assert len(rows) == 30 and len({r["id"] for r in rows}) == 30
    assert load_prompts("packaged", 30, seed=5) == rows
    kinds = {r["id"].rsplit("-", 1)[0] for r in rows}
    assert kinds == {"shk-cont", "kjv-cont", "shk-plain"}
    assert all(("reference" in r) == ("cont" in r["id"]) for r in rows)


def test_prompt_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"question": "where is the prompt?"}\n')
    with pytest.raises(UserError, match=r"p.jsonl line 2: expected a non-empty 'prompt'"):
        load_prompts(str(bad))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="is empty"):
        load_prompts(str(empty))
    done = run_train("recipe=seq_distill", f"prompts.source={bad}", check=False)
    assert done.returncode == 2 and "line 2: expected a non-empty 'prompt'" in done.stderr.splitlines()[-1]


def test_agreement_metrics() -> None:
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("a b c", "x y z") == 0.0
    assert rouge_l("the cat sat", "the dog sat down") == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))
    assert token_match([1, 2, 3], [1, 5, 3, 4]) == 0.5
    assert token_match([], []) == 1.0
