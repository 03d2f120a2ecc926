"""Generation speed and memory: tokens/s with the KV cache, time to first token, peak memory.

Prompts are equal-length windows of real text (no padding), decoding is greedy with a fixed number of new
tokens, and each figure is the median of ``repeats`` timed runs after one untimed warm-up. Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA; on CPU it is the weights plus the larger of the KV cache the
generation ends with (from its tensors) and the rise of the process's resident set (VmHWM, reset before the run).
"""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from distillprune.errors import UserError
from distillprune.models import eval_mode


def weights_mb(model: torch.nn.Module) -> float:
    """Bytes of the model's parameters and buffers, in MiB (a tied embedding counted once)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


@torch.no_grad()
def generation_speed(
    model: PreTrainedModel,
    prompts: torch.Tensor,
    batch_sizes: list[int],
    new_tokens: int = 32,
    repeats: int = 3,
    pad_token_id: int | None = None,
) -> dict[str, dict[str, float]]:
    """Greedy generation of ``new_tokens`` after each row of ``prompts`` ([N, P] token ids, N >= the largest
    batch size), per batch size: ``tokens_per_s`` (new tokens of the batch over the whole call, prefill
    included), ``decode_tokens_per_s`` (after the first token), ``ttft_ms`` (prefill + first token) and
    ``peak_mb``."""
    if new_tokens < 2:
        raise UserError(f"evaluate.speed.new_tokens={new_tokens}: use at least 2 (the first token is the TTFT)")
    if prompts.shape[0] < max(batch_sizes):
        raise UserError(f"evaluate.speed: {prompts.shape[0]} prompt windows for a batch of {max(batch_sizes)}")
    with eval_mode(model):
        device = next(model.parameters()).device
        out = {}
        for bs in batch_sizes:
            ids = prompts[:bs].to(device)  # [B, P]
            first, _ = _median_time(lambda ids=ids: _generate(model, ids, 1, pad_token_id), repeats)
            whole, peak = _timed_with_peak(lambda ids=ids: _generate(model, ids, new_tokens, pad_token_id), repeats)
            out[str(bs)] = {
                "tokens_per_s": round(bs * new_tokens / whole, 2),
                "decode_tokens_per_s": round(bs * (new_tokens - 1) / max(whole - first, 1e-9), 2),
                "ttft_ms": round(first * 1000, 1),
                "peak_mb": round(weights_mb(model) + peak if device.type == "cpu" else peak, 1),
            }
    return out


def _generate(model: PreTrainedModel, ids: torch.Tensor, new_tokens: int, pad_token_id: int | None) -> Any:
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=pad_token_id,
        return_dict_in_generate=True,
    )


def cache_mb(cache: Any) -> float:
    """Bytes held by a KV cache (transformers' ``Cache`` with ``layers``, or legacy nested tuples), in MiB."""
    if cache is None:
        return 0.0
    layers = getattr(cache, "layers", None)
    pairs = [(getattr(x, "keys", None), getattr(x, "values", None)) for x in layers] if layers else list(cache)
    tensors = [t for pair in pairs for t in pair if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _median_time(fn, repeats: int) -> tuple[float, Any]:
    """Median seconds of ``fn`` over ``repeats`` timed calls after an untimed warm-up, and the last call's result."""
    out = fn()  # warm-up: allocator, kernels, lazy imports
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _timed_with_peak(fn, repeats: int) -> tuple[float, float]:
    """Median seconds of ``fn`` and its peak memory beyond the weights in MiB: CUDA's allocator peak; on CPU the
    larger of the KV cache that the call ends with and the rise of the resident set (the allocator's reuse of
    freed memory can hide the rise, the cache is measured from its tensors)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        seconds, _ = _median_time(fn, repeats)
        return seconds, torch.cuda.max_memory_allocated() / 2**20
    before = _rss_kb("VmRSS")
    reset = _reset_peak_rss()
    seconds, out = _median_time(fn, repeats)
    rise = max(_rss_kb("VmHWM") - before, 0) / 1024 if reset else 0.0
    return seconds, max(rise, cache_mb(getattr(out, "cache", None) or out.past_key_values))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _rss_kb(field: str) -> int:
    status = Path("/proc/self/status")
    if not status.is_file():
        return 0
    match = re.search(rf"{field}:\s+(\d+)", status.read_text())
    return int(match.group(1)) if match else 0


def _reset_peak_rss() -> bool:
    """Reset the process's VmHWM to its current size (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
