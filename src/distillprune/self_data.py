"""Recovery text that the unpruned model writes itself (self-data distillation): the ``data.source`` part ``self``.

Before pruning, the dense model samples ``self_data.documents`` documents, each from a bare document start (the
BOS token, or the end-of-text token that separated pre-training documents; no other prompt), with nucleus
sampling. The documents are stored (``generate.GenerationStore``: written once per model, settings and seed,
resumed after a kill, shared among ranks) and written to ``output_dir/data/self.jsonl``, which the part ``self``
of ``data.source`` then names: ``data.source=self``, or a mixture such as
``shakespeare:0.3+kjv:0.2+self:0.5``. Such text covers whatever domains the model saw in pre-training (code,
reference prose, stories), where a packaged corpus covers one or two, and KD on it asks the pruned model to
match the dense one where the dense one is most at home (data-free generation as in LLM-QAT, Liu et al. 2023).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distillprune.data import leading_bos, write_splits
from distillprune.errors import UserError
from distillprune.generate import stored_generations
from distillprune.sources import SELF, mixture_parts

log = logging.getLogger(__name__)


def document_start(tok: PreTrainedTokenizerBase) -> int:
    """The token a pre-training document followed: BOS where the tokenizer starts every encoding with it (Llama
    3, Gemma), else the end-of-text separator where the vocabulary has one (SmolLM2, GPT-2, Qwen), else EOS."""
    bos = leading_bos(tok)
    if bos is not None:
        return bos
    separator = tok.convert_tokens_to_ids("<|endoftext|>")  # the unknown-token id when it is not in the vocabulary
    known = isinstance(separator, int) and tok.convert_ids_to_tokens(separator) == "<|endoftext|>"
    return separator if known else tok.eos_token_id


def self_documents(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, model_name: str, c: DictConfig, seed: int
) -> list[dict[str, Any]]:
    """``c.documents`` texts sampled from ``model`` after a bare document start (stored and reused), as
    ``{"id", "text"}`` rows; a row that ends at once (nothing but a stop token) is left out."""
    start = document_start(tok)
    rows = [{"id": f"self-{i}"} for i in range(int(c.documents))]
    settings = {"max_new_tokens": int(c.max_new_tokens), "do_sample": True, "temperature": float(c.temperature),
                "top_p": float(c.top_p)}  # fmt: skip
    written = stored_generations(model, tok, model_name, rows, lambda _: [start], settings,
                                 {"prompt_set": "document start", "start_id": start}, int(c.batch_size),
                                 c.cache_dir, seed, extra_stops=(start,))  # fmt: skip
    return [{"id": r["id"], "text": written[r["id"]]["response"]} for r in rows if written[r["id"]]["response"]]


def resolve(cfg: DictConfig, model: PreTrainedModel, tok: PreTrainedTokenizerBase, out: Path) -> dict[str, Any]:
    """When ``data.source`` has the part ``self``: write the dense model's documents and point that part at
    their file (``cfg.data.source`` is rewritten in place, so the dense control and the evaluation read the same
    text); returns what was generated, for ``metrics.json`` (empty when there is no such part)."""
    parts = mixture_parts(str(cfg.data.source))
    if SELF not in [name for name, _ in parts]:
        return {}
    t0 = time.perf_counter()
    docs = self_documents(model, tok, str(cfg.model.name), cfg.self_data, int(cfg.seed))
    if len(docs) < 2:
        raise UserError(f"self_data: the dense model wrote {len(docs)} non-empty documents of "
                        f"{cfg.self_data.documents}; ask for more (self_data.documents) or longer ones "
                        "(self_data.max_new_tokens)")  # fmt: skip
    path = write_splits(out / "data", {"self": docs})["self"]
    named = [(str(path) if name == SELF else name, share) for name, share in parts]
    cfg.data.source = named[0][0] if len(named) == 1 else "+".join(f"{name}:{share:.6g}" for name, share in named)
    tokens = sum(len(ids) for ids in tok([d["text"] for d in docs], add_special_tokens=False)["input_ids"])
    info = {"documents": len(docs), "tokens": tokens, "file": str(path),
            "generate_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
    log.info("self data: %d documents, %d tokens written by the dense model to %s", len(docs), tokens, path)
    return info
