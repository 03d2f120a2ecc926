"""The names ``validate`` checks agree with the code that implements them; damaged files that only show up later
(a generation store, a packaged GGUF, a model folder's weights) are one-line errors that name the file and keep it."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from distillprune import assets, choices, models
from distillprune.errors import UserError
from distillprune.generate import GenerationStore


def test_choices_agree_with_the_implementations() -> None:
    from distillprune.evaluation.zeroshot import TASKS
    from distillprune.incontext import PACKAGED
    from distillprune.objective import Objective
    from distillprune.prune.allocation import METHODS as ALLOCATIONS
    from distillprune.prune.depth import DEPTH_IMPORTANCE
    from distillprune.prune.groups import FAMILIES
    from distillprune.prune.importance import AGGREGATIONS, METHODS
    from distillprune.prune.surgery import GQA_MODES
    from distillprune.recipes.seq_distill import STAGES
    from distillprune.strategies import ZERO

    assert (
        tuple(sorted(FAMILIES)) == choices.PRUNABLE
        and DEPTH_IMPORTANCE == choices.DEPTH_IMPORTANCE
        and GQA_MODES == choices.GQA_MODES
        and tuple(AGGREGATIONS) == choices.AGGREGATIONS
    )
    assert (
        METHODS == choices.IMPORTANCE
        and tuple(TASKS) == choices.ZERO_SHOT_TASKS
        and ("auto", *Objective.IMPLS) == choices.LOSS_IMPLS
    )
    assert ("auto", *models.DTYPES) == choices.DTYPES and STAGES == choices.SEQ_STAGES
    assert tuple(PACKAGED) == choices.ICL_TASKS and ALLOCATIONS == choices.ALLOCATIONS
    assert set(choices.STRATEGIES) == {"auto", "ddp", "fsdp", *ZERO}


def test_a_damaged_store_is_named_and_kept(tmp_path: Path) -> None:
    store = GenerationStore(tmp_path, {"teacher": "t"})
    store.append([{"id": "a", "response": "x"}, {"id": "b", "response": "y"}])
    text = store.path.read_text().splitlines()
    store.path.write_text(text[0] + "\n" + '{"id": "b", "resp\n' + text[1] + "\n")  # a damaged middle line
    with pytest.raises(UserError, match=f"generation store {store.path} line 2 is corrupt"):
        GenerationStore(tmp_path, {"teacher": "t"}).rows()
    assert store.path.read_text().count("\n") == 3  # left as it was
    (store.dir / "provenance.json").write_text('{"teacher": "someone else"}')
    with pytest.raises(UserError, match="was written for other settings"):
        GenerationStore(tmp_path, {"teacher": "t"})


def test_a_corrupt_packaged_gguf_is_named_and_kept(tmp_path: Path, monkeypatch) -> None:
    package = tmp_path / "site" / "fake_gguf_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00 and then garbage")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(models.ALIASES, "broken-gguf", assets.PackagedGGUF("fake_gguf_pkg", "model.gguf"))
    monkeypatch.setenv("DISTILLPRUNE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match=f"model 'broken-gguf': {package / 'model.gguf'} cannot be read as GGUF"):
        models.resolve("broken-gguf")
    assert (package / "model.gguf").is_file() and not (tmp_path / "cache" / "models" / "broken-gguf").exists()
    (package / "model.gguf").unlink()
    with pytest.raises(UserError, match="model.gguf is missing"):
        models.resolve("broken-gguf")
    sys.modules.pop("fake_gguf_pkg", None)


def test_damaged_weights_in_a_model_folder_are_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short
    with pytest.raises(UserError, match=f"could not load '{folder}' from the local folder"):
        models.load_model(str(folder))
    assert weights.stat().st_size == 1000
