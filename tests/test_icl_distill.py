"""In-context distillation: aligned teacher/student views, the task, bad input, and the recipe end to end."""

from __future__ import annotations

import json
import re
from importlib.metadata import version
from pathlib import Path

import pytest

from conftest import icl_overrides, run_train
from distillprune.errors import UserError
from distillprune.incontext import PACKAGED, Task, answer_matches, encode_views, load_task, standard_error
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
    rows = load_task("shakespeare_or_bible", 20, seed=0).rows
    assert len(rows) == 20 and {r["output"] for r in rows} == {"Shakespeare", "Bible"}
    good = tmp_path / "good.jsonl"
    good.write_text('{"input": "a", "output": "b"}\n{"input": "c", "output": "d"}\n')
    task = load_task(str(good), None, 0)
    assert task.rows == [{"input": "a", "output": "b"}, {"input": "c", "output": "d"}]
    assert task.instruction is None and not task.case_sensitive  # auto: a file has no instruction of its own
    assert load_task(str(good), 1, 0, "Say it.").instruction == "Say it." and len(load_task(str(good), 1, 0).rows) == 1
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"input": "a", "output": "b"}\n{"input": "a", "label": "b"}\n')
    with pytest.raises(UserError, match="t.jsonl line 2: expected string fields 'input' and 'output'"):
        load_task(str(bad), None, 0)
    with pytest.raises(UserError, match="not a packaged task \\(capitalise, verse_book, last_word"):
        load_task("no_such_task", None, 0)


@pytest.mark.parametrize("name", list(PACKAGED))
def test_packaged_tasks(name: str) -> None:
    task = load_task(name, 300, seed=5)
    rows = task.rows
    assert len(rows) == 300 and rows == load_task(name, 300, seed=5).rows  # seeded
    assert rows != load_task(name, 300, seed=6).rows
    assert len({r["input"] for r in rows}) == 300  # no item twice, so eval, demos and training never share one
    assert task.instruction == PACKAGED[name][1] and load_task(name, 4, 5, None).instruction is None
    for r in rows:
        if name == "capitalise":
            assert r["input"].islower() and r["output"] == r["input"][0].upper() + r["input"][1:]
        elif name == "last_word":
            assert r["input"].rstrip(".,;:!?'-").endswith(r["output"]) and " " not in r["output"]
        elif name == "verse_book":
            reference = r["input"].removeprefix(r["output"] + " ").split()[0]  # "1 John 3:16 text": "3:16"
            assert r["input"].startswith(r["output"] + " ") and re.fullmatch(r"\d+:\d+", reference)
    if name == "shakespeare_or_bible":
        assert task.chance(rows) == 0.5  # two balanced classes
    else:
        assert task.chance(rows) < 0.2  # an open answer: no one answer is common


def test_chance_and_standard_error() -> None:
    rows = [{"input": str(i), "output": o} for i, o in enumerate(["Yes.", "yes", "No", "maybe"])]
    assert Task(rows, None).chance(rows) == 0.5  # "Yes." and "yes" are the same answer ignoring case
    assert Task(rows, None, case_sensitive=True).chance(rows) == 0.25
    assert standard_error(0.5, 300) == round((0.25 / 300) ** 0.5, 4) < 0.03  # the recipe's n_eval at worst
    assert standard_error(1.0, 10) == 0.0


def test_answer_matching() -> None:
    assert answer_matches("Bible.", "Bible") and answer_matches("  shakespeare, surely", "Shakespeare")
    assert not answer_matches("The text is from the Bible", "Bible")
    assert not answer_matches("", "Bible")
    assert answer_matches("1 Corinthians.", "1 Corinthians") and not answer_matches("Corinthians", "1 Corinthians")
    assert answer_matches("King", "King", case_sensitive=True) and answer_matches("king", "King")
    assert not answer_matches("king", "King", case_sensitive=True)
    assert not answer_matches("KING", "King", case_sensitive=True)


@pytest.mark.parametrize("kd_weight", ["1.0", "0.0"])
def test_icl_distill_end_to_end(kd_weight: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_train(
        "recipe=icl_distill", *icl_overrides(tiny_model_dir, out, tmp_path / "gen"), f"system.kd_weight={kd_weight}"
    )
    metrics = json.loads((out / "metrics.json").read_text())
    accuracy = metrics["accuracy"]
    assert set(accuracy) == {"teacher_zero_shot", "teacher_few_shot", "student_before", "student_after"}
    assert metrics["task"] == "capitalise" and metrics["accuracy_se"] == {
        k: standard_error(v, 8) for k, v in accuracy.items()
    }
    assert 0 < metrics["chance"] <= 1
    assert metrics["versions"]["lightning"] == version("lightning") and metrics["versions"]["torch"]
    # the student starts as a copy of the teacher and sees the teacher's zero-shot prompt
    assert accuracy["student_before"] == accuracy["teacher_zero_shot"]
    note = f"accuracy on capitalise (8 items, chance {metrics['chance']:.3f}): teacher_zero_shot"
    assert note in (out / "report.md").read_text()
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
