"""Every recipe end to end through ``python train.py`` on a tiny random Llama: files, metrics, export, resume."""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import ROOT, run_train, tiny_overrides
from distillprune.checkpoint import AtomicCheckpointIO
from distillprune.config import RECIPES_DIR, available_recipes


def _student_state(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert not any(k.startswith("teacher.") for k in state), "checkpoints must not carry the frozen teacher"
    return {k.removeprefix("student."): v for k, v in state.items()}


DISTILL_RECIPES = ["logit_distill", "sft"]  # the logit-distillation runner (sft: kd_weight 0)
END_TO_END = {
    **{name: "tests/test_recipes.py::test_recipe_end_to_end" for name in DISTILL_RECIPES},
    "seq_distill": "tests/test_seq_distill.py::test_seq_distill_end_to_end",
    "icl_distill": "tests/test_icl_distill.py::test_icl_distill_end_to_end",
    "prune_lora": "tests/test_prune.py::test_prune_recipe_end_to_end",
    "prune_distill": "tests/test_prune.py::test_prune_recipe_end_to_end",
    "prune_magnitude": "tests/test_prune.py::test_prune_magnitude_end_to_end",
    "evaluate": "tests/test_evaluation.py::test_evaluate_recipe_side_by_side",
    "quantize": "tests/test_quantize.py::test_quantize_recipe_end_to_end",
    "compress": "tests/test_quantize.py::test_compress_recipe_end_to_end",
    "prune_depth": "tests/test_depth_kv.py::test_prune_depth_end_to_end",
    "merge_kv": "tests/test_depth_kv.py::test_merge_kv_end_to_end",
}


def test_every_recipe_has_its_runner_and_an_end_to_end_test() -> None:
    assert set(available_recipes()) == set(END_TO_END), "add an end-to-end test for each new recipe"
    for name in available_recipes():  # one runner module per recipe YAML, of the same name, entry ``run``
        assert OmegaConf.load(RECIPES_DIR / f"{name}.yaml")._target_ == f"distillprune.recipes.{name}.run", name
    for name, test in END_TO_END.items():
        path, func = test.split("::")
        assert f"def {func}(" in (ROOT / path).read_text(), f"{name}: {test} is missing"


def _block_keys_and_comments(text: str, block: str) -> list[tuple[str, str]]:
    """``(key path, comment)`` for each line of the top-level ``block`` of a recipe's text."""
    rows, path, inside = [], [], False
    for line in text.splitlines():
        match = re.match(r"^( *)(\w+):([^#]*)(?:#\s*(.*))?$", line)
        if match is None:
            continue
        depth = len(match[1]) // 2
        if depth == 0:
            inside = match[2] == block
        if inside:
            path = [*path[:depth], match[2]]
            rows.append((".".join(path), (match[4] or "").strip()))
    return rows


@pytest.mark.parametrize("block", ["trainer", "evaluate", "quantize", "checkpoint", "logger"])
def test_shared_blocks_have_the_same_keys_and_comments_in_every_recipe(block: str) -> None:
    found = {name: _block_keys_and_comments((RECIPES_DIR / f"{name}.yaml").read_text(), block)
             for name in available_recipes()}  # fmt: skip
    found = {name: rows for name, rows in found.items() if rows}
    reference = found["logit_distill"]
    assert len(found) >= 2 and len(reference) > 2
    for name, rows in found.items():
        assert rows == reference, f"recipes/{name}.yaml: its {block} block differs from logit_distill's"


@pytest.mark.parametrize("recipe", DISTILL_RECIPES)
def test_recipe_end_to_end(recipe: str, tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / recipe
    wandb = "offline" if recipe == "sft" else "disabled"  # one recipe also writes a W&B offline run
    run_train(f"recipe={recipe}", *tiny_overrides(tiny_model_dir, tiny_text_file, out), f"logger.wandb.mode={wandb}")
    if wandb == "offline":  # the run, with the report's plots as media
        assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(list((out / "wandb").glob("offline-run-*/files/media/images/report/*.png"))) == 2

    assert (out / "config.yaml").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4
    for name in ("teacher", "student_init", "student"):
        assert metrics[name]["val_ppl"] > 1 and metrics[name]["tokens"] > 0
    assert metrics["student"]["val_loss"] < metrics["student_init"]["val_loss"]  # four steps already help
    assert metrics["tokens_per_s"] > 0 and metrics["wall_s"] > 0
    evaluation = metrics["evaluation"]["models"]  # the evaluation stage: teacher beside student
    assert list(evaluation) == ["teacher", "student"]
    assert evaluation["student"]["params"] < evaluation["teacher"]["params"]
    assert evaluation["student"]["perplexity"]["ppl"] > 1 and set(evaluation["student"]["speed"]) == {"1", "4"}
    assert "| student |" in (out / "report.md").read_text()
    for png in ("training_curves", "val_ppl"):
        assert (out / "report" / f"{png}.png").stat().st_size > 5000

    with open(out / "logs" / "metrics.csv") as f:
        columns = set(next(csv.reader(f)))
    expected = {"train/loss", "train/ce", "train/tokens_per_s", "val/loss", "val/ppl"}
    assert expected | ({"train/kd"} if recipe != "sft" else set()) <= columns

    # export -> stock from_pretrained -> the very weights that training ended with
    final = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    trained = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out / "final")).eval()
    trained.load_state_dict(_student_state(out / "checkpoints" / "last.ckpt"))
    ids = torch.arange(5, 25).unsqueeze(0)  # [1, T]
    torch.testing.assert_close(final(ids).logits, trained(ids).logits, rtol=0, atol=0)


def test_chat_data_gradient_checkpointing_and_accumulation(
    tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    rows = [{"prompt": f"Count to {i}", "response": " ".join(str(j) for j in range(i + 1))} for i in range(40)]
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "chat"
    run_train(
        "recipe=logit_distill",
        *tiny_overrides(tiny_model_dir, tiny_text_file, out),
        "data._target_=distillprune.data.ChatDataModule",
        f"data.source={chat}",
        "data.seq_len=64",
        "student.gradient_checkpointing=true",
        "trainer.accumulate_grad_batches=2",
        "loss._target_=distillprune.losses.JSD",
        "loss.beta=0.5",
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4
    assert metrics["student"]["val_loss"] < metrics["student_init"]["val_loss"]
    assert metrics["student"]["tokens"] < 2 * 64 * 2  # only answer tokens are scored


def test_resume_continues_step_count_optimizer_and_data(
    tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    # a run that "died" after its step-4 checkpoint, resumed elsewhere, must end where the straight run ends
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("recipe=logit_distill", "system.warmup_steps=1")  # past warmup: the cosine schedule matters
    run_train(*common, *tiny_overrides(tiny_model_dir, tiny_text_file, straight, steps=6))
    step4 = straight / "checkpoints" / "step000004.ckpt"
    assert torch.load(step4, map_location="cpu", weights_only=True)["global_step"] == 4
    run_train(*common, *tiny_overrides(tiny_model_dir, tiny_text_file, resumed, steps=6), f"resume={step4}")
    assert json.loads((resumed / "metrics.json").read_text())["steps"] == 6

    a = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 6
    assert a["lr_schedulers"][0]["_last_lr"] == b["lr_schedulers"][0]["_last_lr"]
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=0)
    for sa, sb in zip(
        a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values(), strict=True
    ):
        torch.testing.assert_close(sb["exp_avg_sq"], sa["exp_avg_sq"], rtol=0, atol=0)

    # resume=auto picks up the run folder's own last checkpoint and goes on counting from there
    run_train(*common, *tiny_overrides(tiny_model_dir, tiny_text_file, resumed, steps=8), "resume=auto")
    assert json.loads((resumed / "metrics.json").read_text())["steps"] == 8


def test_checkpoint_write_killed_midway_keeps_the_previous_one(tmp_path: Path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def dies_halfway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial bytes of a checkpoint")
        raise KeyboardInterrupt("killed during the write")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    loaded = io.load_checkpoint(path)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.ones(3))


def test_on_policy_on_plain_text_is_a_one_line_error(
    tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    args = tiny_overrides(tiny_model_dir, tiny_text_file, tmp_path / "x")
    done = run_train("recipe=logit_distill", *args, "system.lmbda=0.5", check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: system.lmbda > 0 needs prompt/response data (e.g. distillprune.data.ChatDataModule)"
    )


def test_wandb_mode_from_the_environment_wins_over_auto(tmp_path: Path, monkeypatch) -> None:
    from distillprune.recipes.common import build_loggers

    wandb = {"mode": "auto", "project": "p", "entity": None, "name": None}
    cfg = OmegaConf.create({"resume": None, "recipe": "x", "logger": {"wandb": wandb}})
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # would mean online without the environment's mode
    assert [type(lg).__name__ for lg in build_loggers(cfg, tmp_path)] == ["CSVLogger"]
    cfg.logger.wandb.mode = "offline"  # an explicit recipe setting is still the recipe's
    monkeypatch.setenv("WANDB_MODE", "disabled")
    try:
        assert [type(lg).__name__ for lg in build_loggers(cfg, tmp_path)] == ["CSVLogger", "WandbLogger"]
    finally:  # W&B's service exports WANDB_SERVICE: later subprocesses (SLURM jobs) must not share this one
        import wandb

        wandb.finish()
        wandb.teardown()
        os.environ.pop("WANDB_SERVICE", None)


def test_one_output_folder_per_launch(monkeypatch) -> None:
    from distillprune.config import default_output_dir

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-42")  # torchrun's rendezvous id: the same on every node
    assert default_output_dir("logit_distill") == "runs/logit_distill-job-42"
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    assert default_output_dir("logit_distill") == "runs/logit_distill-777"
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun --standalone on one node
    assert default_output_dir("sft").startswith("runs/sft-20")


def test_schedule_by_epochs_decays_over_the_estimated_steps(
    tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "epochs"
    args = tiny_overrides(tiny_model_dir, tiny_text_file, out)
    run_train("recipe=sft", *args, "trainer.max_steps=-1", "trainer.max_epochs=1", "trainer.limit_train_batches=6",
              "system.warmup_steps=1", "system.min_lr_ratio=0.0", "evaluate.speed.batch_sizes=[]")  # fmt: skip
    with open(out / "logs" / "metrics.csv") as f:
        lrs = {int(r["step"]): float(r["train/lr"]) for r in csv.DictReader(f) if r.get("train/lr")}
    assert json.loads((out / "metrics.json").read_text())["steps"] == 6
    # cosine from step 1 to 6 optimizer steps (the trainer's estimate), not to max_steps=-1
    progress = (5 - 1) / (6 - 1)
    assert lrs[5] == pytest.approx(3e-4 * 0.5 * (1 + math.cos(math.pi * progress)), rel=1e-4)
