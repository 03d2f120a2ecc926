"""GGUF files for llama.cpp, written with gguf-py from an in-memory Hugging Face Llama-family model.

- Architecture: ``llama`` when every layer has the same widths. llama.cpp's ``llama`` builds every layer's tensors
  with layer 0's sizes, so a model pruned to different widths per layer is written as ``deci`` (Nemotron-NAS),
  whose loader and graph read ``head_count``, ``head_count_kv`` and ``feed_forward_length`` per layer.
- Query and key projections are permuted from Hugging Face's rotate-half layout to the interleaved pairs that
  llama.cpp's rotary embedding expects (the per-layer head counts of a ``deci`` file included); transformers'
  GGUF loader undoes the same permutation, which is what the tests use to check a file without llama.cpp.
- Types: F32, F16 and BF16, and the block types gguf-py quantizes in numpy (Q8_0, Q5_0, Q4_0, Q4_1). Norms stay
  F32; a weight whose rows do not split into 32-wide blocks falls back to F16; with a 4- or 5-bit type the token
  embedding (which is also the output layer when tied) is Q8_0, as llama.cpp's mixes keep it wider. K-quants
  (Q4_K_M, Q5_K_M, Q6_K) come from llama.cpp's own quantizer (``llama-cpp-python``), applied to an F16 file.
  ``tensor_types`` reads back the type of every tensor actually written.
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distillprune.assets import ALIASES
from distillprune.errors import UserError
from distillprune.prune.groups import head_dim, layer_widths
from distillprune.quant.settings import GGUF_FAMILIES, LLAMA_CPP_TYPES, check_type

BLOCK = 32  # the row block of every numpy block type


def export_gguf(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path, qtype: str = "F16", name: str = ""
) -> dict[str, Any]:
    """Write ``model`` to ``path`` as a GGUF file of ``qtype``; returns its architecture, bytes and tensor types."""
    check_type(qtype)
    config = model.config
    if config.model_type not in GGUF_FAMILIES:
        raise UserError(
            f"GGUF export knows the Llama family ({', '.join(GGUF_FAMILIES)}); {config.model_type!r} is not one of them"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    if qtype in LLAMA_CPP_TYPES:  # llama.cpp quantizes an F16 file of ours
        f16 = path.with_name(f"{path.name}.f16.{os.getpid()}.tmp")
        arch = _write(model, tokenizer, f16, "F16", name)
        _llama_cpp_quantize(f16, tmp, LLAMA_CPP_TYPES[qtype])
        f16.unlink()
    else:
        arch = _write(model, tokenizer, tmp, qtype, name)
    os.replace(tmp, path)
    return {
        "file": str(path),
        "type": qtype,
        "architecture": arch,
        "bytes": path.stat().st_size,
        "tensor_types": tensor_types(path),
    }


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each type the file holds (a K-quant mix falls back per tensor: this says to what)."""
    from gguf import GGUFReader

    return dict(sorted(Counter(t.tensor_type.name for t in GGUFReader(path).tensors).items()))


def _write(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path, qtype: str, name: str) -> str:
    """Write the file; returns its architecture (``llama`` or ``deci``)."""
    import gguf

    config, widths, hd = model.config, layer_widths(model), head_dim(model)
    rope = _rope_theta(config)
    arch = "llama" if _uniform(widths) else "deci"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(name or Path(str(config._name_or_path or "model")).name)
    writer.add_file_type(_file_type(qtype))
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(len(widths))
    if arch == "llama":
        writer.add_feed_forward_length(widths[0].intermediate)
        writer.add_head_count(widths[0].heads)
        writer.add_head_count_kv(widths[0].kv_heads)
    else:
        writer.add_feed_forward_length([w.intermediate for w in widths])
        writer.add_head_count([w.heads for w in widths])
        writer.add_head_count_kv([w.kv_heads for w in widths])
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    writer.add_rope_dimension_count(hd)
    writer.add_rope_freq_base(rope)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    _add_tokenizer(writer, tokenizer, config.vocab_size)
    for gguf_name, tensor in _tensors(model, widths, hd):
        _add_tensor(writer, gguf_name, tensor, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return arch


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    if scaling not in (None, "default"):
        raise UserError(f"GGUF export writes plain rotary embeddings; this model's rope_type is {scaling!r}")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _file_type(qtype: str) -> int:
    import gguf

    return {
        "F32": gguf.LlamaFileType.ALL_F32,
        "F16": gguf.LlamaFileType.MOSTLY_F16,
        "BF16": gguf.LlamaFileType.MOSTLY_BF16,
        "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
        "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
        "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[qtype]


def _rope_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from [first half | second half] (rotate-half) to interleaved pairs (x0, x_half, x1, ...)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _tensors(model: PreTrainedModel, widths: list, hd: int) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) of every weight, q/k permuted, in llama.cpp's order."""
    base = model.model
    out = [("token_embd.weight", base.embed_tokens.weight)]
    for i, (layer, w) in enumerate(zip(base.layers, widths, strict=True)):
        attn, mlp = layer.self_attn, layer.mlp
        if any(getattr(attn, p).bias is not None for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise UserError("GGUF export of the llama graph has no attention biases; this model has them")
        out += [
            (f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight),
            (f"blk.{i}.attn_q.weight", _rope_permute(attn.q_proj.weight, w.heads)),
            (f"blk.{i}.attn_k.weight", _rope_permute(attn.k_proj.weight, w.kv_heads)),
            (f"blk.{i}.attn_v.weight", attn.v_proj.weight),
            (f"blk.{i}.attn_output.weight", attn.o_proj.weight),
            (f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight),
            (f"blk.{i}.ffn_gate.weight", mlp.gate_proj.weight),
            (f"blk.{i}.ffn_up.weight", mlp.up_proj.weight),
            (f"blk.{i}.ffn_down.weight", mlp.down_proj.weight),
        ]
    out.append(("output_norm.weight", base.norm.weight))
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != base.embed_tokens.weight.data_ptr():
        out.append(("output.weight", head.weight))  # untied; tied models reuse token_embd
    return out


def _add_tensor(writer: Any, name: str, tensor: torch.Tensor, qtype: str) -> None:
    import gguf

    data = tensor.detach().to(torch.float32).cpu().numpy()
    kind = qtype
    if data.ndim == 1:
        kind = "F32"
    elif qtype in ("Q4_0", "Q4_1", "Q5_0") and name in ("token_embd.weight", "output.weight"):
        kind = "Q8_0"
    if kind not in ("F32", "F16", "BF16") and data.shape[-1] % BLOCK:
        kind = "F16"  # rows that 32-wide blocks do not tile
    if kind == "F32":
        writer.add_tensor(name, data)
    elif kind == "F16":
        writer.add_tensor(name, data.astype(np.float16))
    else:
        qt = gguf.GGMLQuantizationType[kind]
        writer.add_tensor(name, gguf.quants.quantize(data, qt), raw_dtype=qt)


def _add_tokenizer(writer: Any, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (Llama 3, SmolLM2, Qwen): its tokens, types and merges, as llama.cpp's gpt2 model."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"GGUF export writes byte-level BPE tokenizers; this one is {model.get('type') or 'not fast'}")
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id = {i: t for t, i in model["vocab"].items()} | {i: t["content"] for i, t in added.items()}
    tokens, types = [], []
    for i in range(vocab_size):  # embedding rows past the tokenizer (padding to a multiple) get placeholder tokens
        token = by_id.get(i, f"[PAD{i}]")
        tokens.append(token)
        if i in added:
            types.append(3 if added[i].get("special") else 4)  # control, user-defined
        else:
            types.append(1 if i in by_id else 5)  # normal, unused
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tokens))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "pad", "unk"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _pre_tokenizer(tokens: list[str]) -> str:
    """llama.cpp's name for the pre-tokenizer: the packaged SmolLM2 GGUF's when the vocabulary is SmolLM2's
    (students of the packaged teacher), else llama.cpp's ``default``."""
    packaged = _packaged_vocabulary()
    if packaged is None or packaged[0] != len(tokens) or list(packaged[1]) != tokens[: len(packaged[1])]:
        return "default"
    return packaged[2]


@functools.cache
def _packaged_vocabulary() -> tuple[int, tuple[str, ...], str] | None:
    """(size, first 512 tokens, pre-tokenizer) of the packaged SmolLM2 GGUF, read once; None if not installed."""
    import importlib.util

    from gguf import GGUFReader

    packaged = ALIASES["smollm2-135m"]
    spec = importlib.util.find_spec(packaged.module)
    if spec is None:
        return None
    reader = GGUFReader(Path(next(iter(spec.submodule_search_locations))) / packaged.file)
    field, pre = reader.fields["tokenizer.ggml.tokens"], reader.fields["tokenizer.ggml.pre"]
    first = tuple(bytes(field.parts[j]).decode() for j in field.data[:512])
    return len(field.data), first, bytes(pre.parts[pre.data[0]]).decode()


def _llama_cpp_quantize(src: Path, dst: Path, ftype: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    code = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if code != 0:
        raise UserError(f"llama.cpp could not quantize {src.name} (code {code})")


def _uniform(widths: list) -> bool:
    return all(w == widths[0] for w in widths)
