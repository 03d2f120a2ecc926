"""What the machine decides: the run's device, its precision, the frozen models' dtype, the attention kernel and
the optimizer kernel. Each ``auto`` choice is a pure function of facts that tests can pass in (CUDA present?
flash-attn installed? fast bfloat16?), so every branch is exercised on any CPU; the choice is logged in one line
and kept for ``metrics.json`` (``decisions``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from distillprune.choices import ATTENTION, PRECISIONS
from distillprune.errors import UserError

log = logging.getLogger(__name__)

_DECISIONS: dict[str, dict[str, str]] = {}


def decide(key: str, choice: str, why: str) -> str:
    """Record (and log, in one line) what an ``auto`` setting chose and why; returns the choice."""
    if _DECISIONS.get(key) != {"choice": choice, "why": why}:
        log.info("auto %s: %s (%s)", key, choice, why)
    _DECISIONS[key] = {"choice": choice, "why": why}
    return choice


def decisions() -> dict[str, dict[str, str]]:
    """Every choice recorded in this process: ``{key: {"choice", "why"}}``."""
    return {k: dict(v) for k, v in _DECISIONS.items()}


def uses_cuda(accelerator: str = "auto", cuda_available: bool | None = None) -> bool:
    """Whether ``trainer.accelerator`` puts the run on a CUDA GPU."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if accelerator in ("gpu", "cuda") and not cuda:
        raise UserError(f"trainer.accelerator={accelerator} but no CUDA GPU is visible; use auto or cpu")
    return accelerator in ("auto", "gpu", "cuda") and cuda


def check_devices(accelerator: str, devices: int | str) -> None:
    """``trainer.devices`` that this machine has: GPUs on a CUDA run, cores on a CPU run (one process each)."""
    if not isinstance(devices, int):
        return
    if devices < 1:
        raise UserError(f"trainer.devices={devices}: use a positive number of devices")
    if uses_cuda(accelerator):
        available = torch.cuda.device_count()
        if devices > available:
            raise UserError(f"trainer.devices={devices} but this machine has {available} CUDA GPU(s); use at most that")
    elif devices > (os.cpu_count() or 1):
        raise UserError(
            f"trainer.devices={devices} CPU processes but this machine has {os.cpu_count()} cores; use at most that"
        )


def run_device(accelerator: str = "auto", cuda_available: bool | None = None) -> torch.device:
    """The device this process trains on, and where it loads models for the work before and after ``fit``
    (generation, calibration, perplexity, evaluation): its local rank's GPU, or the CPU; a device named
    outright (``cuda:1``, where a recipe takes a ``device``) is used as it is."""
    if accelerator not in ("auto", "cpu", "cuda", "gpu"):
        return torch.device(accelerator)
    if uses_cuda(accelerator, cuda_available):
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", rank)
        decide("device", str(device), f"trainer.accelerator={accelerator}, CUDA present, local rank {rank}")
    else:
        device = torch.device("cpu")
        why = "no CUDA GPU" if accelerator == "auto" else f"trainer.accelerator={accelerator}"
        decide("device", "cpu", why)
    return device


def resolve_precision(precision: str, accelerator: str = "auto", fast_bf16: bool | None = None) -> str:
    """``auto``: ``bf16-mixed`` where the hardware runs bfloat16 fast (a CUDA GPU with bf16; a CPU with AMX or
    AVX512-BF16), else ``32-true``. Other values are used as given (a warning where bf16 will crawl)."""
    if precision not in PRECISIONS:
        raise UserError(f"trainer.precision '{precision}' is unknown; choose {', '.join(PRECISIONS)}")
    on_gpu = uses_cuda(accelerator)
    if fast_bf16 is None:
        fast_bf16 = torch.cuda.is_bf16_supported() if on_gpu else cpu_has_fast_bf16()
    where = "CUDA GPU" if on_gpu else "CPU"
    if precision == "auto":
        choice = "bf16-mixed" if fast_bf16 else "32-true"
        return decide("precision", choice, f"{where} {'with' if fast_bf16 else 'without fast'} bfloat16 support")
    if precision.startswith("bf16") and not fast_bf16:
        log.warning("precision %s on a %s without fast bfloat16 runs many times slower than 32-true (auto)",
                    precision, where)  # fmt: skip
    return decide("precision", precision, "as requested")


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16 in /proc/cpuinfo: the CPUs where bfloat16 matmuls beat float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("amx_bf16", "avx512_bf16"))


def resolve_dtype(dtype: str, device: torch.device, role: str = "model", bf16_ok: bool | None = None) -> str:
    """``auto`` for a frozen model (teacher, reference): bfloat16 on a GPU that has it (half the memory, the
    kernels that flash attention needs), float32 on the CPU. Other names are used as given."""
    if dtype != "auto":
        return dtype
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported() if bf16_ok is None else bf16_ok
        choice = "bfloat16" if ok else "float16"
        return decide(f"{role}_dtype", choice, f"frozen {role} on {device}")
    return decide(f"{role}_dtype", "float32", f"frozen {role} on the CPU")


def choose_attention(
    requested: str, device: torch.device, dtype: torch.dtype, flash_installed: bool | None = None, role: str = "model"
) -> str:
    """``auto``: ``flash_attention_2`` for a model on CUDA in 16-bit weights when flash-attn is installed, else
    ``sdpa``; flash attention is never chosen for a CPU model or float32 weights (its kernels have neither).
    An explicit ``flash_attention_2`` that cannot run is a one-line error."""
    if requested not in ATTENTION:
        raise UserError(f"attn_implementation '{requested}' is unknown; choose {', '.join(ATTENTION)}")
    has_flash = importlib.util.find_spec("flash_attn") is not None if flash_installed is None else flash_installed
    half = dtype in (torch.float16, torch.bfloat16)
    if requested == "auto":
        if not has_flash:
            return decide(f"{role}_attention", "sdpa", "flash-attn is not installed")
        if device.type != "cuda":
            return decide(f"{role}_attention", "sdpa", f"the model is on {device.type}, flash-attn needs CUDA")
        if not half:
            return decide(f"{role}_attention", "sdpa", f"{str(dtype).removeprefix('torch.')} weights; flash-attn "
                          "needs float16/bfloat16")  # fmt: skip
        return decide(f"{role}_attention", "flash_attention_2", f"flash-attn installed, {device}, 16-bit weights")
    if requested == "flash_attention_2" and not (has_flash and device.type == "cuda" and half):
        raise UserError(
            "attn_implementation=flash_attention_2 needs flash-attn, a model on a CUDA GPU and dtype bfloat16 or "
            "float16; use auto or sdpa"
        )
    return decide(f"{role}_attention", requested, "as requested")


LIBRARIES = ("torch", "transformers", "lightning", "trl", "peft", "deepspeed", "compressed-tensors", "llama-cpp-python")


def library_versions() -> dict[str, str | None]:
    """Python's and the installed versions of the libraries a result depends on (None: not installed)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out
