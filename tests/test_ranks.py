"""Several ranks before training: all of them started at once, teacher generation split between them into a
store that concurrent writers share, pruning done once by rank 0 (2-process gloo runs on the CPU)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import prune_overrides, run_train, seq_overrides
from distillprune.generate import GenerationStore

needs_two_cores = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two CPU processes need two cores")


def test_concurrent_writers_share_a_store_and_never_cut_each_other(tmp_path: Path) -> None:
    a, b = (GenerationStore(tmp_path, {"t": 1}, writer=w) for w in ("rank0", "rank1"))
    a.append([{"id": "a1"}])
    b.append([{"id": "b1"}, {"id": "a1"}])  # a duplicate id counts once
    with b.path.open("a") as f:
        f.write('{"id": "b2", "respo')  # rank 1 is in the middle of a write
    assert {r["id"] for r in GenerationStore(tmp_path, {"t": 1}, writer="rank0").rows()} == {"a1", "b1"}
    assert b.path.read_text().endswith('"respo')  # another writer's unfinished line is skipped, not cut
    GenerationStore(tmp_path, {"t": 1}, writer="rank1")  # its own writer reopening drops the torn tail
    assert b.path.read_text().endswith("\n") and len(GenerationStore(tmp_path, {"t": 1}).rows()) == 2


@needs_two_cores
def test_two_ranks_split_teacher_generation(tiny_model_dir: Path, tmp_path: Path) -> None:
    single, split = tmp_path / "gen1", tmp_path / "gen2"
    common = ["stages=[generate]", "generate.batch_size=4", "trainer.precision=32-true"]
    run_train("recipe=seq_distill", *seq_overrides(tiny_model_dir, tmp_path / "one", single), *common)
    done = run_train("recipe=seq_distill", *seq_overrides(tiny_model_dir, tmp_path / "two", split), *common,
                     "trainer.strategy=ddp", "trainer.devices=2")  # fmt: skip
    store = next(split.iterdir())
    files = sorted(p.name for p in store.glob("rows*.jsonl"))
    assert files == ["rows.rank0.jsonl", "rows.rank1.jsonl"]
    counts = [len(p.read_text().splitlines()) for p in sorted(store.glob("rows*.jsonl"))]
    assert counts == [20, 20]  # 10 batches of 4, every other one per rank
    assert "teacher generation (rank 1 of 2): 20/40" in done.stderr
    one = {json.loads(x)["id"]: json.loads(x)["response_ids"] for x in (next(single.iterdir()) / "rows.jsonl").open()}
    two = {}
    for path in store.glob("rows*.jsonl"):
        two |= {json.loads(x)["id"]: json.loads(x)["response_ids"] for x in path.open()}
    assert two == one  # the same answers as one process writes, each once


@needs_two_cores
def test_rank_zero_prunes_once_and_the_others_load_it(tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path):
    """On the dense model's own documents (data.source=self): both ranks write them into one store first."""
    out, cache = tmp_path / "pd", tmp_path / "self"
    done = run_train("recipe=prune_distill", *prune_overrides(tiny_model_dir, tiny_text_file, out),
                     "trainer.strategy=ddp", "trainer.devices=2", "evaluate.speed.batch_sizes=[]",
                     "data.source=self", "self_data.documents=32", "self_data.max_new_tokens=40",
                     "self_data.batch_size=8", f"self_data.cache_dir={cache}")  # fmt: skip
    store = next(cache.iterdir())
    assert sorted(p.name for p in store.glob("rows*.jsonl")) == ["rows.rank0.jsonl", "rows.rank1.jsonl"]
    assert "teacher generation (rank 1 of 2): 16/32" in done.stderr  # 4 batches of 8, every other one per rank
    assert done.stderr.count("loading the model that rank 0 pruned from") == 1
    assert "rank 1 waiting for every rank: pruning on rank 0" in done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert abs(metrics["params"]["removed_fraction"] - 0.2) < 0.01 and set(metrics["val_ppl"]) == {
        "dense", "pruned", "recovered"}  # fmt: skip
    assert 2 <= metrics["self_data"]["documents"] <= 32
