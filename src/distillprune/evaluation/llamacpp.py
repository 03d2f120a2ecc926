"""A GGUF file run by llama.cpp (``llama-cpp-python``), measured the way the Hugging Face models are: perplexity
of the same held-out token stream in the same windows, greedy decoding speed with the same prompt and new-token
counts, batch 1. Optional: ``make bench`` installs llama-cpp-python (it compiles llama.cpp, minutes on 2 cores);
without it ``available()`` is False and the GGUF rows carry size and tensor types only."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from distillprune.errors import UserError
from distillprune.evaluation.metrics import windowed_perplexity


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


class LlamaCpp:
    """One GGUF file loaded by llama.cpp on the CPU, with every position's logits kept (for perplexity)."""

    def __init__(self, path: Path, context: int, threads: int | None = None) -> None:
        if not available():
            raise UserError("llama-cpp-python is not installed (pip install llama-cpp-python, or `make bench`)")
        from llama_cpp import Llama

        self.path = path
        self.threads = threads or torch.get_num_threads()
        self.llm = Llama(
            model_path=str(path), n_ctx=context, n_batch=context, n_threads=self.threads, logits_all=True,
            verbose=False,
        )  # fmt: skip

    def logits(self, window: torch.Tensor) -> torch.Tensor:
        """Logits [1, W, V] of one window [1, W] of token ids, from an empty cache."""
        tokens = window.reshape(-1).tolist()
        self.llm.reset()
        self.llm.eval(tokens)
        return torch.from_numpy(self.llm.scores[: len(tokens)].copy()).unsqueeze(0)

    def perplexity(self, ids: torch.Tensor, context: int, stride: int) -> dict[str, float]:
        return windowed_perplexity(self.logits, ids, context, stride)

    def greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        """The ``new_tokens`` greedy continuation of ``prompt`` (argmax of each step's logits, KV cache)."""
        self.llm.reset()
        self.llm.eval(prompt)
        out = []
        for _ in range(new_tokens):
            token = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
            out.append(token)
            self.llm.eval([token])
        return out

    def speed(self, prompt: list[int], new_tokens: int, repeats: int) -> dict[str, Any]:
        """Median greedy decoding tokens/s over ``repeats`` runs (prefill timed apart as time to first token)."""
        runs = []
        for _ in range(max(repeats, 1)):
            self.llm.reset()
            t0 = time.perf_counter()
            self.llm.eval(prompt)
            token = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
            t1 = time.perf_counter()
            for _ in range(new_tokens - 1):
                self.llm.eval([token])
                token = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
            t2 = time.perf_counter()
            runs.append((t1 - t0, t2 - t0, t2 - t1))
        runs.sort(key=lambda r: r[1])
        ttft, total, decode = runs[len(runs) // 2]
        return {
            "tokens_per_s": round(new_tokens / total, 1),
            "decode_tokens_per_s": round((new_tokens - 1) / decode, 1) if new_tokens > 1 else None,
            "ttft_ms": round(ttft * 1000, 1),
            "threads": self.threads,
        }
