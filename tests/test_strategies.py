"""Multi-process training on the CPU, each run a ``python train.py`` subprocess (never ``strategy="ddp"`` inside
pytest's own process): DDP, DeepSpeed ZeRO-2 and ZeRO-3, and FSDP2 with 2 ranks each give the losses and the
exported weights of one process on the same global batch, through a checkpoint and a resume."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import icl_overrides, prune_overrides, run_train, seq_overrides, tiny_overrides
from distillprune.data import ResumableSampler
from distillprune.errors import UserError
from distillprune.strategies import FSDP2, DeepSpeed, build_strategy

needs_two_cores = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two CPU processes need two cores")


def _losses(out: Path) -> dict[int, float]:
    with open(out / "logs" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def _train_twice(model_dir: Path, text: Path, out: Path, batch: int, *extra: str) -> Path:
    """4 steps, then a resume from the step-4 checkpoint to step 6: the path a stopped job takes."""
    common = ["system.warmup_steps=1", f"data.batch_size={batch}", "data.val_batches=1", "trainer.precision=32-true",
              *extra]  # fmt: skip  # after the tiny ones
    run_train("recipe=logit_distill", *tiny_overrides(model_dir, text, out, steps=4), *common)
    run_train("recipe=logit_distill", *tiny_overrides(model_dir, text, out, steps=6), "resume=auto", *common)
    return out


@pytest.fixture(scope="module")
def single(tiny_model_dir: Path, tiny_text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train_twice(tiny_model_dir, tiny_text_file, tmp_path_factory.mktemp("single") / "run", 4)


MULTI = {  # strategy -> the other settings it runs with (each KD implementation and teacher placement once)
    "ddp": ["system.loss_impl=fused_linear", "system.teacher_on_cpu=true"],
    "deepspeed_stage_2": ["system.loss_impl=chunked"],
    "deepspeed_stage_3": ["system.loss_impl=chunked"],
    "fsdp": [],
}


@needs_two_cores
@pytest.mark.parametrize("strategy", sorted(MULTI))
def test_two_ranks_equal_one_process_through_resume(
    strategy: str, single: Path, tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    out = _train_twice(
        tiny_model_dir, tiny_text_file, tmp_path / strategy, 2,
        f"trainer.strategy={strategy}", "trainer.devices=2", "data.val_batches=2", *MULTI[strategy],
    )  # fmt: skip  # 2 validation batches of 2: the 4 rows of the single run
    want, got = _losses(single), _losses(out)
    assert sorted(got) == list(range(6))  # steps 0-3, then 4-5 after the resume
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), f"step {step}"

    # the measurements before training: on rank 0 with whole models, or by every rank inside a sharding strategy
    # (and, after the resume, the values of the first start, from the checkpoint)
    one, two = (json.loads((d / "metrics.json").read_text()) for d in (single, out))
    for key in ("teacher", "student_init", "student"):
        assert two[key]["val_loss"] == pytest.approx(one[key]["val_loss"], rel=1e-4), key
    sharded = strategy in ("deepspeed_stage_3", "fsdp")
    assert ("model_loading" in two["auto"]) == sharded
    for model in ("student", "teacher"):  # what rank 0 held once its models were loaded: meta, a half, or all
        held, whole = two["resident_params"][model], two["params"][model]
        assert held == {"fsdp": 0, "deepspeed_stage_3": pytest.approx(whole / 2, rel=0.01)}.get(strategy, whole)

    ckpt = out / "checkpoints"
    assert (ckpt / "last.ckpt").resolve().name == "step000006.ckpt"
    assert not list(ckpt.glob("*.tmp"))
    if strategy != "ddp":  # ZeRO and FSDP checkpoints are folders of per-rank shards
        assert (ckpt / "step000006.ckpt").is_dir()

    a = AutoModelForCausalLM.from_pretrained(single / "final")
    b = AutoModelForCausalLM.from_pretrained(out / "final")  # consolidated on rank 0: a plain HF folder
    assert next(b.parameters()).dtype == torch.float32
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-5, msg=name)


def test_sampler_shards_the_single_process_order() -> None:
    one = list(ResumableSampler(11, seed=3))
    ranks = [list(ResumableSampler(11, seed=3, rank=r, world=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 5  # the odd tail is dropped, so ranks stay in step
    batches = [sorted(ranks[0][i : i + 2] + ranks[1][i : i + 2]) for i in (0, 2)]
    assert batches == [sorted(one[0:4]), sorted(one[4:8])]  # rank batches of 2 make the batches of 4
    resumed = ResumableSampler(11, seed=3, rank=1, world=2)
    resumed.skip = 2
    assert list(resumed) == ranks[1][2:]


def test_sampler_counts_the_targets_of_each_optimizer_step() -> None:
    targets = [i % 5 + 1 for i in range(20)]  # uneven: chat answers of different lengths
    one = list(ResumableSampler(20, seed=3, targets=targets, batch_size=4))
    assert all(n == sum(targets[i] for i, _ in one[s : s + 4]) for s in range(0, 20, 4) for _, n in one[s : s + 4])
    accumulated = list(ResumableSampler(20, seed=3, targets=targets, batch_size=2, accumulate=2))
    assert accumulated == one  # two micro-batches of 2 are one step of 4
    ranks = [list(ResumableSampler(20, seed=3, rank=r, world=2, targets=targets, batch_size=2)) for r in (0, 1)]
    for step in range(5):  # both ranks carry the count of the whole global batch of 4
        pair = ranks[0][2 * step : 2 * step + 2] + ranks[1][2 * step : 2 * step + 2]
        assert sorted(pair) == sorted(one[4 * step : 4 * step + 4])


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [{"prompt": f"Count to {i}", "response": " ".join(str(j) for j in range(i % 13 + 1))} for i in range(48)]
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_step_loss_is_the_mean_over_all_target_tokens(
    tiny_model_dir: Path, tiny_text_file: Path, chat_file: Path, tmp_path: Path
) -> None:
    # uneven answer lengths: batch 4 == 2 micro-batches of 2 (accumulation) == 2 ranks of 2 (DDP)
    def run(name: str, *extra: str) -> Path:
        out = tmp_path / name
        run_train(
            "recipe=logit_distill", *tiny_overrides(tiny_model_dir, tiny_text_file, out, steps=3),
            "data._target_=distillprune.data.ChatDataModule", f"data.source={chat_file}", "data.seq_len=64",
            "trainer.precision=32-true", "system.warmup_steps=0", "system.lr=3e-3", "evaluate.speed.batch_sizes=[]",
            *extra,
        )  # fmt: skip
        return out

    runs = {"batch4": run("batch4", "data.batch_size=4"),
            "accumulate": run("accumulate", "data.batch_size=2", "trainer.accumulate_grad_batches=2")}  # fmt: skip
    if (os.cpu_count() or 1) >= 2:
        runs["ddp"] = run("ddp", "data.batch_size=2", "trainer.strategy=ddp", "trainer.devices=2")
    want = AutoModelForCausalLM.from_pretrained(runs["batch4"] / "final").state_dict()
    # the same weights (AdamW magnifies float noise on rows with near-zero gradients, hence atol); with per-micro-batch
    # or per-rank means instead, steps weigh short answers up and the weights move apart by ~1e-3
    for name, atol in (("accumulate", 1e-5), ("ddp", 1e-4)):
        if name not in runs:
            continue
        got = AutoModelForCausalLM.from_pretrained(runs[name] / "final").state_dict()
        worst = max((got[k] - v).abs().max().item() for k, v in want.items())
        assert worst < atol, f"{name}: weights differ by {worst:.2e}"
    if "ddp" in runs:  # the logged step loss is the mean over the global batch's tokens too
        for step, loss in _losses(runs["batch4"]).items():
            assert _losses(runs["ddp"])[step] == pytest.approx(loss, rel=1e-5), f"step {step}"


def test_strategy_names() -> None:
    assert build_strategy("auto") == "auto" and build_strategy("ddp", "cpu", 2) == "ddp"
    zero3 = build_strategy("deepspeed_stage_3", "cpu", 2)
    assert isinstance(zero3, DeepSpeed) and zero3.config["zero_optimization"]["stage"] == 3
    assert zero3.exclude_frozen_parameters  # the frozen teacher is never written to checkpoints
    assert isinstance(build_strategy("fsdp", "cpu", 2), FSDP2)


def test_deepspeed_json_passthrough(tmp_path: Path) -> None:
    config = tmp_path / "ds.json"
    config.write_text('{"zero_optimization": {"stage": 2, "overlap_comm": false}, "train_micro_batch_size_per_gpu": 2}')
    strategy = build_strategy(str(config), "cpu", 1)
    assert strategy.config["zero_optimization"] == {"stage": 2, "overlap_comm": False}


def test_offload_without_cpu_adam_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import deepspeed.git_version_info as info

    monkeypatch.setitem(info.installed_ops, "cpu_adam", False)
    monkeypatch.setattr("shutil.which", lambda name: None)  # a machine without ninja cannot build it either
    with pytest.raises(UserError, match="needs DeepSpeed's cpu_adam op"):
        build_strategy("deepspeed_stage_2_offload", "cpu", 1)


BAD = {
    "trainer.strategy=deepspeed_stage_4": "error: trainer.strategy 'deepspeed_stage_4' is unknown; choose auto, ddp, "
    "deepspeed_stage_1, deepspeed_stage_2, deepspeed_stage_2_offload, deepspeed_stage_3, deepspeed_stage_3_offload, "
    "fsdp, a DeepSpeed config .json",
    "trainer.devices=4096": "error: trainer.devices=4096 CPU processes but this machine has",
    "trainer.strategy=missing.json": "error: trainer.strategy=missing.json: no such file or folder",
    "teacher.attn_implementation=flash_attention_2": "error: attn_implementation=flash_attention_2 needs flash-attn",
}


@pytest.mark.parametrize("override", sorted(BAD))
def test_bad_scale_settings_are_one_line_errors(
    override: str, tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    done = run_train("recipe=logit_distill", *tiny_overrides(tiny_model_dir, tiny_text_file, tmp_path), override,
                     check=False)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(BAD[override])


def test_fused_linear_under_zero3_says_what_to_use(tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    args = tiny_overrides(tiny_model_dir, tiny_text_file, tmp_path)
    done = run_train("recipe=logit_distill", *args, "trainer.strategy=deepspeed_stage_3",
                     "system.loss_impl=fused_linear", check=False)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: system.loss_impl=fused_linear needs whole lm_head weights; under "
        "trainer.strategy=deepspeed_stage_3 use system.loss_impl=chunked (or deepspeed_stage_2 / ddp for fused_linear)"
    )


def test_bf16_true_gradient_checkpointing_and_fused_loss(
    tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bf16"
    run_train(
        "recipe=logit_distill", *tiny_overrides(tiny_model_dir, tiny_text_file, out),
        "trainer.precision=bf16-true", "student.gradient_checkpointing=true", "system.loss_impl=fused_linear",
    )  # fmt: skip
    losses = _losses(out)
    assert len(losses) == 4 and all(0 < v < 20 for v in losses.values())
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert final(torch.arange(3, 9)[None]).logits.isfinite().all()


@needs_two_cores
def test_prune_lora_under_zero3_and_fsdp_exports_the_plain_merged_model(
    tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    def run(name: str, *extra: str) -> dict[str, torch.Tensor]:
        out = tmp_path / name
        run_train("recipe=prune_lora", *prune_overrides(tiny_model_dir, tiny_text_file, out), "lora.dropout=0.0",
                  "trainer.precision=32-true", "evaluate.speed.batch_sizes=[]", *extra)  # fmt: skip
        final = AutoModelForCausalLM.from_pretrained(out / "final")  # the registered per-layer type, merged
        assert not any("lora" in n or "base_layer" in n for n, _ in final.named_parameters())
        return final.state_dict()

    want = run("single", "data.batch_size=4")  # the global batch of 2 ranks x 2
    for strategy in ("deepspeed_stage_3", "fsdp"):
        got = run(strategy, f"trainer.strategy={strategy}", "trainer.devices=2")
        assert sorted(got) == sorted(want)
        worst = max((got[k] - v).abs().max().item() for k, v in want.items())
        assert worst < 1e-5, f"{strategy}: merged weights differ by {worst:.2e}"


@needs_two_cores
@pytest.mark.parametrize("strategy", ["deepspeed_stage_3", "fsdp"])
def test_sharded_on_policy_gkd_with_uneven_sample_lengths(
    strategy: str, tiny_model_dir: Path, tiny_text_file: Path, chat_file: Path, tmp_path: Path
) -> None:
    # a student that stops at any of 120 stop ids: the ranks' samples end after different numbers of tokens, and
    # each generation step is a collective of the shards; without synced generation the job dies or hangs
    stopper = tmp_path / "stopper"
    shutil.copytree(tiny_model_dir, stopper)
    config = json.loads((stopper / "generation_config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"], *range(10, 130)]
    (stopper / "generation_config.json").write_text(json.dumps(config))
    out = tmp_path / "gkd"
    run_train(
        "recipe=logit_distill", *tiny_overrides(stopper, tiny_text_file, out, steps=3),
        "data._target_=distillprune.data.ChatDataModule", f"data.source={chat_file}", "data.seq_len=64",
        "system.lmbda=1.0", "system.max_new_tokens=16", f"trainer.strategy={strategy}", "trainer.devices=2",
        "system.loss_impl=chunked", "evaluate.speed.batch_sizes=[]", timeout=240,
    )  # fmt: skip
    assert (out / "final" / "model.safetensors").is_file()
    assert "train/on_policy" in (out / "logs" / "metrics.csv").read_text()


@needs_two_cores
def test_fsdp2_under_bf16_mixed_computes_in_bf16_and_exports_float32(
    tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    from distillprune.strategies import fsdp2_policy

    policy = fsdp2_policy("bf16-mixed")
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    assert fsdp2_policy("32-true") is None
    out = tmp_path / "fsdp-bf16"
    run_train("recipe=logit_distill", *tiny_overrides(tiny_model_dir, tiny_text_file, out, steps=3),
              "trainer.strategy=fsdp", "trainer.devices=2", "trainer.precision=bf16-mixed",
              "evaluate.speed.batch_sizes=[]")  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["auto"]["fsdp_mixed_precision"]["choice"] == "bf16 params, fp32 reduce"
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert next(final.parameters()).dtype == torch.float32 and all(v < 20 for v in _losses(out).values())


@needs_two_cores
def test_sharded_loading_of_a_pretrained_student(tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    # the path transformers takes under ZeRO-3 (zero.Init in from_pretrained) and ours under FSDP2 (meta model,
    # each rank reading its rows); the default recipe's layer_drop student takes ours under both (test above)
    def run(name: str, *extra: str) -> Path:
        out = tmp_path / name
        run_train("recipe=logit_distill", *tiny_overrides(tiny_model_dir, tiny_text_file, out, steps=3),
                  "student.init=pretrained", "system.loss_impl=chunked", "evaluate.speed.batch_sizes=[]",
                  *extra)  # fmt: skip
        return out

    single = run("single", "data.batch_size=4", "trainer.precision=32-true")
    fsdp = run("fsdp", "trainer.strategy=fsdp", "trainer.devices=2", "trainer.precision=32-true")
    assert _losses(fsdp) == pytest.approx(_losses(single), rel=1e-5)
    metrics = json.loads((fsdp / "metrics.json").read_text())
    assert metrics["resident_params"]["student"] == 0 and metrics["params"]["student"] > 0
    a, b = (AutoModelForCausalLM.from_pretrained(d / "final") for d in (single, fsdp))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-5, msg=name)
    # ZeRO-3 under bf16-mixed: the partitions are created in bfloat16, the exported model is the float32 masters
    zero3 = run("zero3", "trainer.strategy=deepspeed_stage_3", "trainer.devices=2", "trainer.precision=bf16-mixed")
    assert _losses(zero3) == pytest.approx(_losses(single), rel=3e-2)  # bf16 compute vs float32
    metrics = json.loads((zero3 / "metrics.json").read_text())
    assert metrics["resident_params"]["student"] == pytest.approx(metrics["params"]["student"] / 2, rel=0.01)
    assert next(AutoModelForCausalLM.from_pretrained(zero3 / "final").parameters()).dtype == torch.float32


@needs_two_cores
def test_seq_and_icl_distill_load_the_student_in_shards_and_measure_it_inside_the_strategy(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # the student's answers before training: rank 0 with the whole model, or every rank with the shards (synced
    # generation inside fit); the same greedy answers, so the same scores
    overrides = {"seq_distill": seq_overrides, "icl_distill": icl_overrides}

    def run(recipe: str, name: str, *extra: str) -> dict:
        out = tmp_path / recipe / name
        run_train(f"recipe={recipe}", *overrides[recipe](tiny_model_dir, out, tmp_path / "gen"), "trainer.max_steps=2",
                  "trainer.precision=32-true", "evaluate.speed.batch_sizes=[]", *extra, timeout=400)  # fmt: skip
        return json.loads((out / "metrics.json").read_text())

    one = run("seq_distill", "one", "data.batch_size=4")
    two = run("seq_distill", "fsdp", "data.batch_size=2", "trainer.strategy=fsdp", "trainer.devices=2",
              "system.loss_impl=chunked")  # fmt: skip
    assert two["auto"]["model_loading"]["choice"] == "sharded (fsdp)"
    assert two["teacher_agreement"]["before"] == one["teacher_agreement"]["before"]
    one = run("icl_distill", "one", "data.batch_size=4")
    two = run("icl_distill", "zero3", "data.batch_size=2", "trainer.strategy=deepspeed_stage_3", "trainer.devices=2",
              "system.loss_impl=chunked")  # fmt: skip
    assert two["auto"]["model_loading"]["choice"] == "sharded (zero3)"
    assert two["accuracy"]["student_before"] == one["accuracy"]["student_before"]
