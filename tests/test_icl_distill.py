"""In-context distillation: aligned teacher/student views, the task, bad input, and the recipe end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import icl_overrides, run_train
from distillprune.errors import UserError
from distillprune.incontext import answer_matches, encode_views, load_task
from distillprune.losses import IGNORE_INDEX


def _row(k: int = 2) -> dict:
    shots = []
    for i in range(k):
        shots += [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}"}]
    query = [{"role": "user", "content": "Which one is it?"}]
    return {"teacher": shots + query, "student": query, "answer": "Bible"}


def test_answer_positions_hold_the_same_tokens(tiny_tokenizer) -> None:
    enc = encode_views(_row(3), tiny_tokenizer, seq_len=512)
    s_pos = [i for i, t in enumerate(enc["labels"]) if t != IGNORE_INDEX]
    t_pos = [i for i, t in enumerate(enc["teacher_labels"]) if t != IGNORE_INDEX]
    assert len(s_pos) == len(t_pos) > 0
    assert t_pos[0] > s_pos[0]  # the teacher's answer sits after the demonstrations
    assert [enc["input_ids"][i] for i in s_pos] == [enc["teacher_input_ids"][i] for i in t_pos]
    assert tiny_tokenizer.decode([enc["input_ids"][i] for i in s_pos]).startswith("Bible")
    # demonstration answers are context, not targets
    assert "Answer" not in tiny_tokenizer.decode([enc["teacher_input_ids"][i] for i in t_pos])
    assert enc["prompt_len"] == s_pos[0] and enc["teacher_prompt_len"] == t_pos[0]


def test_demonstrations_longer_than_the_context(tiny_tokenizer) -> None:
    with pytest.raises(UserError, match="more than data.seq_len=16"):
        encode_views(_row(3), tiny_tokenizer, seq_len=16)


def test_task_sources(tmp_path: Path) -> None:
    rows = load_task("shakespeare_or_bible", 20, seed=0)
    assert len(rows) == 20 and {r["output"] for r in rows} == {"Shakespeare", "Bible"}
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"input": "a", "output": "b"}\n{"input": "a", "label": "b"}\n')
    with pytest.raises(UserError, match="t.jsonl line 2: expected string fields 'input' and 'output'"):
        load_task(str(bad), None, 0)


def test_answer_matching() -> None:
    assert answer_matches("Bible.", "Bible") and answer_matches("  shakespeare, surely", "Shakespeare")
    assert not answer_matches("The text is from the Bible", "Bible")
    assert not answer_matches("", "Bible")


@pytest.mark.parametrize("kd_weight", ["1.0", "0.0"])
def test_icl_distill_end_to_end(kd_weight: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_train(
        "recipe=icl_distill", *icl_overrides(tiny_model_dir, out, tmp_path / "gen"), f"system.kd_weight={kd_weight}"
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["accuracy"]) == {"teacher_zero_shot", "teacher_few_shot", "student_before", "student_after"}
    # the student starts as a copy of the teacher and sees the teacher's zero-shot prompt
    assert metrics["accuracy"]["student_before"] == metrics["accuracy"]["teacher_zero_shot"]
    assert metrics["examples"] == {"train": 44, "demos": 8, "eval": 8, "k": 2} and metrics["steps"] == 4
    columns = (out / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert ("train/kd" in columns) == (kd_weight == "1.0")
    train_rows = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert all(len(r["teacher"]) == 5 and len(r["student"]) == 1 for r in train_rows)


def test_bad_icl_input_is_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    for extra, message in [
        ("task.k=9", "task.k=9 demonstrations asked for, but the demonstration pool has 8"),
        ("data.seq_len=40", "more than data.seq_len=40"),
    ]:
        done = run_train(
            "recipe=icl_distill", *icl_overrides(tiny_model_dir, tmp_path / "r", tmp_path / "g"), extra, check=False
        )
        assert done.returncode == 2, done.stderr[-2000:]
        assert message in done.stderr.strip().splitlines()[-1]
