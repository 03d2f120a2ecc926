"""What only a CUDA GPU can show (``make gpu-check``, under 8 minutes on one GPU; skipped without one): every recipe
on a tiny model under bf16-mixed on the GPU, the real SmolLM2 logit_distill, flash attention when installed, ZeRO-2
and FSDP on one device, the fused KD objective against the dense one on CUDA, and torch.cuda.max_memory_allocated
figures. Each test adds its numbers to benchmarks/results/gpu_check.json."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, icl_overrides, prune_overrides, run_train, seq_overrides, tiny_overrides

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
RESULTS = ROOT / "benchmarks" / "results" / "gpu_check.json"
GPU = ["trainer.accelerator=gpu", "trainer.precision=bf16-mixed"]


def _record(name: str, values: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    data["device"] = torch.cuda.get_device_name(0)
    data["torch"] = torch.__version__
    data[name] = values
    RESULTS.write_text(json.dumps(data, indent=2))


def _run(name: str, args: list[str]) -> dict:
    start = time.perf_counter()
    run_train(*args, *GPU)
    out = Path(next(a.split("=", 1)[1] for a in args if a.startswith("output_dir=")))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["auto"]["device"]["choice"] == "cuda:0"
    _record(name, {"wall_s": round(time.perf_counter() - start, 1), "auto": metrics["auto"]})
    return metrics


@pytest.mark.parametrize("recipe", ["logit_distill", "sft"])
def test_logit_recipes_on_the_gpu(recipe: str, tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    metrics = _run(recipe, [f"recipe={recipe}", *tiny_overrides(tiny_model_dir, tiny_text_file, tmp_path / "r")])
    assert metrics["steps"] == 4 and metrics["auto"]["precision"]["choice"] == "bf16-mixed"
    assert metrics["auto"]["teacher_dtype"]["choice"] == "bfloat16"


def test_seq_and_icl_on_the_gpu(tiny_model_dir: Path, tmp_path: Path) -> None:
    _run("seq_distill", ["recipe=seq_distill", *seq_overrides(tiny_model_dir, tmp_path / "s", tmp_path / "g"),
                         "system.lmbda=0.5", "system.kd_weight=0.5"])  # fmt: skip
    _run("icl_distill", ["recipe=icl_distill", *icl_overrides(tiny_model_dir, tmp_path / "i", tmp_path / "g2")])


@pytest.mark.parametrize("recipe", ["prune_lora", "prune_distill", "prune_magnitude"])
def test_prune_recipes_on_the_gpu(recipe: str, tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    args = prune_overrides(tiny_model_dir, tiny_text_file, tmp_path / "p")
    if recipe == "prune_magnitude":
        args = [a for a in args if not a.startswith("prune.calibration")]
    metrics = _run(recipe, [f"recipe={recipe}", *args, "control=true"])  # the recipes' default dense control
    assert set(metrics["val_ppl"]) == {"dense", "pruned", "control", "recovered"}


@pytest.mark.parametrize("strategy", ["deepspeed_stage_2", "fsdp"])
def test_sharded_strategies_on_one_gpu(strategy: str, tiny_model_dir: Path, tiny_text_file: Path, tmp_path) -> None:
    metrics = _run(strategy, ["recipe=logit_distill", *tiny_overrides(tiny_model_dir, tiny_text_file, tmp_path / "z"),
                              f"trainer.strategy={strategy}", "trainer.devices=1"])  # fmt: skip
    assert metrics["steps"] == 4


def test_real_smollm2_logit_distill_20_steps(tmp_path: Path) -> None:
    out = tmp_path / "smollm2"
    metrics = _run("smollm2_logit_distill", [
        "recipe=logit_distill", "trainer.max_steps=20", "trainer.val_check_interval=10", "logger.wandb.mode=disabled",
        "evaluate.zero_shot.tasks=[]", "evaluate.speed.repeats=1", f"output_dir={out}",
    ])  # fmt: skip
    assert metrics["student"]["val_ppl"] < metrics["student_init"]["val_ppl"]
    speed = metrics["evaluation"]["models"]["student"]["speed"]
    _record("smollm2_logit_distill_numbers", {"tokens_per_s_train": metrics["tokens_per_s"], "student_val_ppl": metrics[
        "student"]["val_ppl"], "teacher_val_ppl": metrics["teacher"]["val_ppl"], "generation": speed})  # fmt: skip


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
def test_flash_attention_is_chosen_and_matches_sdpa(tiny_model_dir: Path) -> None:
    from distillprune.models import load_model

    flash = load_model(str(tiny_model_dir), dtype="bfloat16", device="cuda")
    sdpa = load_model(str(tiny_model_dir), dtype="bfloat16", attn_implementation="sdpa", device="cuda")
    assert flash.config._attn_implementation == "flash_attention_2"
    ids = torch.arange(5, 69, device="cuda").unsqueeze(0)  # [1, 64]
    with torch.no_grad():
        torch.testing.assert_close(flash(ids).logits, sdpa(ids).logits, rtol=0.05, atol=0.05)


def test_fused_kd_objective_matches_dense_on_cuda_and_uses_less_memory() -> None:
    from distillprune.losses import JSD
    from distillprune.objective import Objective

    torch.manual_seed(0)
    n, hidden, vocab = 4096, 576, 49152
    h = torch.randn(n, hidden, device="cuda", requires_grad=True)
    head = (torch.randn(vocab, hidden, device="cuda") * 0.02).requires_grad_(True)
    th, t_head = torch.randn(n, hidden, device="cuda"), torch.randn(vocab, hidden, device="cuda") * 0.02
    targets = torch.randint(0, vocab, (n,), device="cuda")
    peaks, grads, values = {}, {}, {}
    for impl in ("dense", "fused_linear"):
        objective = Objective(JSD(beta=0.5), impl)
        h.grad = head.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        if impl == "dense":
            total, _, _ = objective(h @ head.T, th @ t_head.T, targets, 0.5)
        else:
            total, _, _ = objective.fused_linear(h, head, th, t_head, targets, 0.5)
        total.backward()
        torch.cuda.synchronize()
        peaks[impl] = (torch.cuda.max_memory_allocated() - base) / 2**20
        values[impl], grads[impl] = total.item(), (h.grad.clone(), head.grad.clone())
    assert values["fused_linear"] == pytest.approx(values["dense"], rel=1e-4)
    for a, b in zip(grads["fused_linear"], grads["dense"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
    assert peaks["fused_linear"] < 0.5 * peaks["dense"]
    _record("kd_objective_cuda", {"n": n, "vocab": vocab, "peak_mb": {k: round(v, 1) for k, v in peaks.items()}})
