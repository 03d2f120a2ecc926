"""Every machine-dependent choice on every branch, on any CPU: precision, device, frozen-model dtype, attention,
optimizer kernel and gradient clipping; and every recipe end to end under bf16-mixed (the branch that `auto` takes
on GPUs and on CPUs with fast bfloat16, which this machine may not be)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import icl_overrides, prune_overrides, run_train, seq_overrides, tiny_overrides
from distillprune.data import TextDataModule
from distillprune.distill import DistillSystem
from distillprune.errors import UserError
from distillprune.hardware import choose_attention, decisions, resolve_dtype, resolve_precision, run_device
from distillprune.losses import ForwardKL
from distillprune.models import load_model, load_tokenizer

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize(
    ("device", "dtype", "flash", "expected"),
    [
        (GPU, torch.bfloat16, True, "flash_attention_2"),
        (GPU, torch.float16, True, "flash_attention_2"),
        (GPU, torch.float32, True, "sdpa"),  # flash-attn has no float32 kernels
        (GPU, torch.bfloat16, False, "sdpa"),
        (CPU, torch.bfloat16, True, "sdpa"),  # CUDA exists somewhere, but this model is on the CPU
        (CPU, torch.float32, True, "sdpa"),
        (CPU, torch.float32, False, "sdpa"),
        (CPU, torch.bfloat16, False, "sdpa"),
    ],
)
def test_attention_auto_for_every_case(device, dtype, flash: bool, expected: str) -> None:
    assert choose_attention("auto", device, dtype, flash_installed=flash) == expected
    assert decisions()["model_attention"]["choice"] == expected


def test_attention_requested() -> None:
    assert choose_attention("eager", CPU, torch.float32, flash_installed=False) == "eager"
    assert choose_attention("flash_attention_2", GPU, torch.bfloat16, flash_installed=True) == "flash_attention_2"
    for device, dtype, flash in [(CPU, torch.bfloat16, True), (GPU, torch.float32, True), (GPU, torch.bfloat16, False)]:
        with pytest.raises(UserError, match="flash_attention_2 needs flash-attn, a model on a CUDA GPU"):
            choose_attention("flash_attention_2", device, dtype, flash_installed=flash)
    with pytest.raises(UserError, match="attn_implementation 'flash' is unknown"):
        choose_attention("flash", CPU, torch.float32)


def test_models_load_on_the_device_with_its_attention(tiny_model_dir: Path) -> None:
    teacher = load_model(str(tiny_model_dir), dtype="auto", device="cpu", role="teacher")
    assert teacher.dtype == torch.float32 and teacher.device == CPU  # auto on the CPU
    assert teacher.config._attn_implementation == "sdpa"
    assert decisions()["teacher_attention"]["choice"] == "sdpa" and decisions()["teacher_dtype"]["choice"] == "float32"
    bf16 = load_model(str(tiny_model_dir), dtype="bfloat16", device="cpu")
    assert bf16.dtype == torch.bfloat16 and bf16.config._attn_implementation == "sdpa"  # CPU: never flash


def test_precision_auto_on_every_kind_of_machine() -> None:
    assert resolve_precision("auto", "cpu", fast_bf16=True) == "bf16-mixed"
    assert decisions()["precision"] == {"choice": "bf16-mixed", "why": "CPU with bfloat16 support"}
    assert resolve_precision("auto", "cpu", fast_bf16=False) == "32-true"
    assert decisions()["precision"]["why"] == "CPU without fast bfloat16 support"
    assert resolve_precision("bf16-true", "cpu", fast_bf16=False) == "bf16-true"
    with pytest.raises(UserError, match="trainer.precision 'bf16' is unknown"):
        resolve_precision("bf16", "cpu")


def test_device_and_frozen_dtype(monkeypatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert run_device("auto", cuda_available=True) == torch.device("cuda", 3)
    assert run_device("auto", cuda_available=False) == CPU
    assert run_device("cpu", cuda_available=True) == CPU
    assert decisions()["device"] == {"choice": "cpu", "why": "trainer.accelerator=cpu"}
    with pytest.raises(UserError, match="trainer.accelerator=gpu but no CUDA GPU is visible"):
        run_device("gpu", cuda_available=False)
    assert resolve_dtype("auto", GPU, "teacher", bf16_ok=True) == "bfloat16"
    assert resolve_dtype("auto", GPU, "teacher", bf16_ok=False) == "float16"
    assert resolve_dtype("auto", CPU, "teacher") == "float32"
    assert resolve_dtype("float32", GPU, "teacher") == "float32"


class _ClipProbe(DistillSystem):
    """The real system, recording the gradient norm that the optimizer is handed after clipping."""

    norms: list[float]

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        grads = [p.grad.float() for p in self.student.parameters() if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_clipping_under_every_precision(precision: str, tiny_model_dir: Path, tiny_text_file: Path) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    student, teacher = load_model(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    system = _ClipProbe(student, teacher, ForwardKL(), kd_weight=0.5, lr=1e-3, loss_impl="fused_linear")
    system.norms = []
    before = [p.detach().clone() for p in student.parameters()]
    data = TextDataModule(tok, str(tiny_text_file), seq_len=32, batch_size=2, val_batches=1, val_fraction=0.2)
    trainer = L.Trainer(
        max_steps=2, precision=precision, gradient_clip_val=0.01, accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(system, datamodule=data)
    assert decisions()["optimizer"]["choice"] == "AdamW (fused)"  # fused on one device, whatever the precision
    assert len(system.norms) == 2 and all(n <= 0.01 * 1.01 for n in system.norms), system.norms
    assert any(not torch.equal(a, b.to(a.dtype)) for a, b in zip(before, student.parameters(), strict=True))


def _assert_bf16_run(out: Path) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    auto = metrics["auto"]
    assert auto["precision"] == {"choice": "bf16-mixed", "why": "as requested"}
    assert auto["optimizer"]["choice"] == "AdamW (fused)" and auto["device"]["choice"] == "cpu"
    assert (out / "final" / "model.safetensors").is_file()
    return metrics


BF16 = "trainer.precision=bf16-mixed"


@pytest.mark.parametrize("recipe", ["logit_distill", "sft"])
def test_logit_recipes_under_bf16_mixed(recipe: str, tiny_model_dir: Path, tiny_text_file: Path, tmp_path) -> None:
    out = tmp_path / recipe
    run_train(f"recipe={recipe}", *tiny_overrides(tiny_model_dir, tiny_text_file, out), BF16)
    metrics = _assert_bf16_run(out)
    assert metrics["steps"] == 4 and metrics["student"]["val_loss"] < metrics["student_init"]["val_loss"]


def test_seq_distill_under_bf16_mixed(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "seq"
    run_train("recipe=seq_distill", *seq_overrides(tiny_model_dir, out, tmp_path / "gen"), BF16,
              "system.lmbda=0.5", "system.kd_weight=0.5", "system.max_new_tokens=4")  # fmt: skip
    assert _assert_bf16_run(out)["steps"] == 6


def test_icl_distill_under_bf16_mixed(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "icl"
    run_train("recipe=icl_distill", *icl_overrides(tiny_model_dir, out, tmp_path / "gen"), BF16)
    assert _assert_bf16_run(out)["steps"] == 4


@pytest.mark.parametrize("recipe", ["prune_lora", "prune_distill", "prune_magnitude"])
def test_prune_recipes_under_bf16_mixed(recipe: str, tiny_model_dir: Path, tiny_text_file: Path, tmp_path) -> None:
    out = tmp_path / recipe
    args = prune_overrides(tiny_model_dir, tiny_text_file, out)
    if recipe == "prune_magnitude":  # no calibration: magnitudes need no data
        args = [a for a in args if not a.startswith("prune.calibration")]
    run_train(f"recipe={recipe}", *args, BF16)
    metrics = _assert_bf16_run(out)
    assert set(metrics["val_ppl"]) == {"dense", "pruned", "recovered"}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])  # the branches of auto, forced either way
@pytest.mark.parametrize("recipe", ["prune_depth", "merge_kv"])
def test_depth_and_merge_recipes_under_both_precisions(recipe, precision, tiny_model_dir, tiny_text_file, tmp_path):
    from test_depth_kv import _structure_overrides

    out = tmp_path / recipe
    calibration = [f"depth.calibration.source={tiny_text_file}", "depth.calibration.seq_len=32",
                   "depth.calibration.samples=4", "depth.remove=2"] if recipe == "prune_depth" else []  # fmt: skip
    args = _structure_overrides(tiny_model_dir, tiny_text_file, out)
    run_train(f"recipe={recipe}", *args, *calibration, f"trainer.precision={precision}")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["auto"]["precision"] == {"choice": precision, "why": "as requested"}
    assert set(metrics["val_ppl"]) == {"dense", "pruned", "recovered"}
    assert (out / "final" / "model.safetensors").is_file()


def test_optimizer_and_loss_impl_for_every_strategy_and_precision() -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision

    from distillprune.strategies import adamw, build_strategy, resolve_loss_impl

    params = [torch.nn.Parameter(torch.ones(3))]
    fused = adamw(build_strategy("auto", "cpu", 1), Precision())([{"params": params}], lr=1e-3)
    assert fused.defaults["fused"] and decisions()["optimizer"]["choice"] == "AdamW (fused)"
    scaled = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    assert not adamw(build_strategy("auto", "cpu", 1), scaled)([{"params": params}], lr=1e-3).defaults["fused"]
    assert decisions()["optimizer"]["choice"] == "AdamW (foreach)"  # fp16 loss scaling: unscale, then clip
    adamw(build_strategy("deepspeed_stage_2", "cpu", 1))
    assert decisions()["optimizer"]["choice"] == "AdamW"
    adamw(build_strategy("fsdp", "cpu", 1))
    assert decisions()["optimizer"] == {"choice": "AdamW (foreach)", "why": "FSDP2 parameters are DTensor shards"}
    for strategy, impl in [("auto", "fused_linear"), ("ddp", "fused_linear"), ("deepspeed_stage_2", "fused_linear"),
                           ("deepspeed_stage_3", "chunked"), ("fsdp", "chunked"), ("ds.json", "chunked")]:  # fmt: skip
        assert resolve_loss_impl(strategy, "auto") == impl and decisions()["loss_impl"]["choice"] == impl
    assert resolve_loss_impl("fsdp", "dense") == "dense"


def test_evaluate_recipe_in_bfloat16(tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    from conftest import TINY_EVAL

    out = tmp_path / "eval"
    run_train("recipe=evaluate", f"model.name={tiny_model_dir}", f"evaluate.text.source={tiny_text_file}",
              "evaluate.text.val_fraction=0.2", *TINY_EVAL, "model.dtype=bfloat16", "logger.wandb.mode=disabled",
              f"output_dir={out}")  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["evaluation"]["settings"]["dtype"] == "bfloat16"
    assert metrics["auto"]["device"]["choice"] == "cpu" and metrics["auto"]["model_attention"]["choice"] == "sdpa"
