"""A served teacher: the offline store's top-k targets (``logit_store``) from an OpenAI-compatible server's prompt
log-probabilities, instead of a teacher model in this process. The teacher then needs no memory here at all, and
one server (on inference GPUs, say) can feed many training runs.

Two request shapes are spoken (``teacher_store.server.api``):

- ``prompt_logprobs`` (vLLM's ``/v1/completions`` extension): the row's token ids are the prompt, and
  ``prompt_logprobs: k`` returns for every prompt token after the first the k most likely tokens, keyed by id.
- ``llama_cpp_python`` (its server, ``python -m llama_cpp.server --model F.gguf --logits_all true``, the OpenAI
  legacy ``echo`` + ``logprobs``): the row's text is the prompt, and every prompt token's top-k comes back keyed
  by token text. The server's tokens are compared with the row's: from the first that differs (re-tokenising a
  row cut from a longer text can merge tokens) the positions get no teacher term, and a server whose first token
  differs is refused; a text that names no single token of this vocabulary, or several, stays in the tail. Its
  server pairs each token's log-probs with the next position and drops the first (without a BOS token, the only
  case accepted): that position gets no teacher term either.

Servers return log-probabilities at temperature 1, so a store built from one needs ``loss.temperature: 1``.
"""

from __future__ import annotations

import json
import math
import os
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from distillprune.choices import SERVER_APIS as APIS
from distillprune.data import leading_bos
from distillprune.errors import UserError
from distillprune.logit_store import TopK

KEY_ENV = "OPENAI_API_KEY"  # sent as a bearer token when set (vLLM --api-key)


class ServedTeacher:
    """A store source (rows in, one ``TopK`` per row out) that asks a server, ``concurrency`` rows at a time.

    Args:
        url: the server's base address, e.g. ``http://127.0.0.1:8000`` (``/v1/...`` is appended).
        model: the served model's name; None takes the first that ``/v1/models`` lists.
        api: one of ``APIS``.
        k: log-probs per position (the store's k).
        tokenizer: the run's tokenizer (the teacher's: the server must tokenise as it does).
        vocab_size: ids at or above this are left in the tail (a teacher head wider than the student's).
    """

    def __init__(
        self,
        url: str,
        model: str | None,
        api: str,
        k: int,
        tokenizer: PreTrainedTokenizerBase,
        vocab_size: int,
        concurrency: int = 8,
        timeout_s: float = 600.0,
    ) -> None:
        if api not in APIS:
            raise UserError(f"teacher_store.server.api={api!r}: choose from {', '.join(APIS)}")
        self.url, self.api, self.k, self.tokenizer = url.rstrip("/"), api, k, tokenizer
        self.vocab_size, self.concurrency, self.timeout_s = vocab_size, concurrency, timeout_s
        if api == "llama_cpp_python" and leading_bos(tokenizer) is not None:
            raise UserError("api=llama_cpp_python needs a tokenizer that starts no encoding with BOS (as "
                            "SmolLM2's): its echo shifts positions around a BOS; use api=prompt_logprobs")  # fmt: skip
        self.model = model or self._first_model()
        self.positions_without = 0  # target positions the server gave no distribution for (llama_cpp_python)
        self._lock = threading.Lock()
        self._texts: list[str] | None = None  # llama_cpp_python: each id's text, and text -> id where unique
        self._ids: dict[str, int] = {}

    def __call__(self, rows: list[dict[str, Any]]) -> list[TopK]:
        with ThreadPoolExecutor(max(1, min(self.concurrency, len(rows)))) as pool:
            return list(pool.map(self._row, rows))

    # ------------------------------------------------------------------------------------------ one row

    def _row(self, row: dict[str, Any]) -> TopK:
        from distillprune.losses import IGNORE_INDEX

        ids = [int(i) for i in row["input_ids"]]
        labels = [int(i) for i in row.get("labels", ids)]
        dists = self._prompt_logprobs(ids) if self.api == "prompt_logprobs" else self._echo(ids)
        # the target at position t is token t + 1: its distribution is the one the server gives for token t + 1
        chosen = [dists[t + 1] for t in range(len(ids) - 1) if labels[t + 1] != IGNORE_INDEX]
        with self._lock:
            self.positions_without += sum(d is None for d in chosen)
        return self._top_k(chosen)

    def _prompt_logprobs(self, ids: list[int]) -> list[dict[int, float] | None]:
        body = {"model": self.model, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": self.k}
        got = self._choice(body).get("prompt_logprobs")
        if not isinstance(got, list) or len(got) != len(ids):
            raise UserError(f"teacher server {self.url} returned no prompt_logprobs for the row's {len(ids)} tokens "
                            "(is it vLLM? else try teacher_store.server.api=llama_cpp_python)")  # fmt: skip
        return [None if d is None else {int(t): float(v["logprob"]) for t, v in d.items()} for d in got]

    def _echo(self, ids: list[int]) -> list[dict[int, float] | None]:
        texts = self._token_texts()
        body = {"model": self.model, "prompt": self.tokenizer.decode(ids, clean_up_tokenization_spaces=False),
                "echo": True, "logprobs": self.k, "max_tokens": 1, "temperature": 0.0}  # fmt: skip
        logprobs = self._choice(body).get("logprobs") or {}
        tokens, tops = logprobs.get("tokens") or [], logprobs.get("top_logprobs") or []
        # re-tokenising the row's text can merge tokens where the row was cut from a longer text (whitespace
        # runs, mostly): the positions whose context the server saw differently get no distribution
        ours = [texts[t] for t in ids]
        same = next((i for i, (a, b) in enumerate(zip(tokens, ours, strict=False)) if a != b), None)
        same = min(len(tokens), len(ids)) if same is None else same
        if same == 0:
            raise UserError(f"teacher server {self.url} tokenises the rows differently from the run's tokenizer "
                            f"(first token {tokens[:1]} vs {ours[:1]}); serve the teacher's own tokenizer, or "
                            "use a server that takes token ids (api=prompt_logprobs)")  # fmt: skip
        # no BOS: entry i holds the log-probs for token i + 1 (the first entry, for token 1, is dropped)
        dists = [None, None, *(self._by_text(top) for top in tops[1 : len(ids) - 1])]
        dists += [None] * (len(ids) - len(dists))
        return [d if j <= same else None for j, d in enumerate(dists)]

    # ------------------------------------------------------------------------------------------ helpers

    def _top_k(self, dists: list[dict[int, float] | None]) -> TopK:
        """Each position's k most likely ids of this vocabulary; fewer named: -1 slots; the rest is the tail."""
        ids = torch.full((len(dists), self.k), -1, dtype=torch.int32)  # [N, k]
        logprobs = torch.full((len(dists), self.k), float("-inf"), dtype=torch.float16)  # [N, k]
        tail = torch.zeros(len(dists), dtype=torch.float32)  # [N]: a position with nothing named is all tail
        for n, dist in enumerate(dists):
            named = sorted(((v, i) for i, v in (dist or {}).items() if 0 <= i < self.vocab_size), reverse=True)
            named = named[: self.k]
            for j, (value, i) in enumerate(named):
                ids[n, j], logprobs[n, j] = i, value
            left = 1.0 - math.fsum(math.exp(v) for v, _ in named)
            tail[n] = math.log(left) if left > 1e-12 else float("-inf")
        return TopK(ids, logprobs, tail)

    def _token_texts(self) -> list[str]:
        """Every id's text as llama.cpp's detokeniser gives it (bytes that are not whole UTF-8 characters
        dropped, special tokens empty); texts that several ids share name none of them."""
        with self._lock:  # the first rows ask at once
            if self._texts is None:
                special = set(self.tokenizer.all_special_ids)
                texts = [
                    "" if i in special else self.tokenizer.decode([i]).replace("\ufffd", "")
                    for i in range(len(self.tokenizer))
                ]
                seen: dict[str, int] = {}
                for i, text in enumerate(texts):
                    seen[text] = -1 if text in seen else i
                self._ids = {t: i for t, i in seen.items() if i >= 0}
                self._texts = texts
            return self._texts

    def _by_text(self, top: dict[str, float]) -> dict[int, float]:
        return {self._ids[t]: float(v) for t, v in top.items() if t in self._ids}

    def _choice(self, body: dict[str, Any]) -> dict[str, Any]:
        reply = self._request("/v1/completions", body)
        try:
            return reply["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise UserError(f"teacher server {self.url} answered without choices: {str(reply)[:200]}") from None

    def _first_model(self) -> str:
        try:
            return str(self._request("/v1/models")["data"][0]["id"])
        except (KeyError, IndexError, TypeError):
            raise UserError(f"teacher server {self.url} lists no model at /v1/models; set "
                            "teacher_store.server.model") from None  # fmt: skip

    def _request(self, path: str, body: dict[str, Any] | None = None) -> Any:
        headers = {"Content-Type": "application/json"}
        if os.environ.get(KEY_ENV):
            headers["Authorization"] = f"Bearer {os.environ[KEY_ENV]}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as err:
            detail = err.read()[:300].decode(errors="replace").replace("\n", " ")
            raise UserError(f"teacher server {self.url}{path}: HTTP {err.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as err:
            raise UserError(f"teacher server {self.url} cannot be reached ({getattr(err, 'reason', err)})") from None
        except json.JSONDecodeError:
            raise UserError(f"teacher server {self.url}{path} did not answer in JSON") from None
