"""The quantization part of a recipe's last stage: a model's quantized copies, measured beside it.

A recipe with a ``quantize`` block (the ``quantize`` and ``compress`` recipes; any training recipe where the
block lists something) gets, for the last model of its evaluation (the student, or the recovered model):

- ``copies``: the model cast to each of ``quantize.dtypes`` and quantized to each scheme (every decoder linear
  layer: round-to-nearest, or GPTQ / AWQ on ``quantize.calibration`` through llm-compressor), each scheme saved
  as a compressed-tensors folder vLLM serves (``output_dir/quantized/<scheme>/``; a calibrated one is always
  saved and measured as loaded back from it); they join the side-by-side evaluation;
- ``gguf_rows``: GGUF files for llama.cpp (``output_dir/gguf/``), measured under llama.cpp (PPL of the same
  held-out windows, batch-1 tokens/s) when llama-cpp-python is installed;
- ``table``: one row per format (file size, weights in memory, tokens/s, PPL, zero-shot) for ``metrics.json``,
  the report and its plot.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distillprune.data import calibration_ids
from distillprune.evaluation import llamacpp
from distillprune.hardware import decide
from distillprune.quant.calibrated import calibrated_folder
from distillprune.quant.gguf import export_gguf
from distillprune.quant.model import checked_targets, load_compressed, quantize_model, save_compressed, stored_bytes
from distillprune.quant.settings import CALIBRATED, Scheme


def wanted(q: DictConfig | None) -> bool:
    """Whether a recipe's ``quantize`` block asks for anything."""
    return q is not None and bool(list(q.dtypes) or list(q.schemes) or list(q.gguf.types))


def copies(
    q: DictConfig, label: str, model: PreTrainedModel, tok: PreTrainedTokenizerBase, out: Path, seed: int
) -> tuple[dict[str, PreTrainedModel], dict[str, dict[str, Any]]]:
    """The quantized copies of ``model`` (named by dtype or scheme) and the first rows of the table."""
    schemes = [Scheme.of(dict(s)) for s in q.schemes]
    for scheme in schemes:  # every scheme fits every layer before the first file is written (the settings
        checked_targets(model, scheme, tuple(q.ignore))  # themselves were checked by validate)
    models: dict[str, PreTrainedModel] = {}
    table = {label: {"format": "safetensors", "file_bytes": stored_bytes(model, {})}}
    for dtype in q.dtypes:
        models[str(dtype)] = copy.deepcopy(model).to(getattr(torch, str(dtype)))
        table[str(dtype)] = {"format": "safetensors", "file_bytes": stored_bytes(models[str(dtype)], {})}
    ids = None  # calibration windows, drawn once for every GPTQ / AWQ scheme
    for scheme in schemes:
        if scheme.method in CALIBRATED:
            if ids is None:
                c = q.calibration
                ids = calibration_ids(tok, str(c.source), int(c.samples), int(c.seq_len), seed)  # [n, T]
            models[scheme.name], table[scheme.name] = _calibrated(q, scheme, model, tok, out, ids)
            continue
        quantized = copy.deepcopy(model)
        grids = quantize_model(quantized, scheme, tuple(q.ignore))
        row: dict[str, Any] = {"format": "compressed-tensors", "file_bytes": stored_bytes(quantized, grids)}
        row["weight_rel_error"] = _weight_error(model, quantized, grids)
        if q.save:
            folder = save_compressed(quantized, tok, grids, scheme, out / "quantized" / scheme.name)
            row |= {"folder": str(folder), "file_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors"))}
        models[scheme.name] = quantized
        table[scheme.name] = row
    return models, table


def _calibrated(
    q: DictConfig, scheme: Scheme, model: PreTrainedModel, tok: PreTrainedTokenizerBase, out: Path, ids: torch.Tensor
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """A GPTQ / AWQ copy as loaded back from its compressed-tensors folder, and its row."""
    start = time.perf_counter()
    folder = calibrated_folder(model, tok, scheme, ids, out / "quantized" / scheme.name, tuple(q.ignore))
    row: dict[str, Any] = {"format": "compressed-tensors", "method": scheme.method, "folder": str(folder)}
    row["quantize_s"] = round(time.perf_counter() - start, 1)
    row["calibration"] = {"source": str(q.calibration.source), "windows": len(ids), "seq_len": ids.shape[1]}
    row["file_bytes"] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    loaded = load_compressed(folder, model.dtype).to(model.device).eval()
    if scheme.method == "gptq":  # AWQ rescales the weights (and the norms before them): no like-for-like error
        row["weight_rel_error"] = _weight_error(model, loaded, checked_targets(model, scheme, tuple(q.ignore)))
    return loaded, row


def gguf_rows(
    q: DictConfig,
    ev: DictConfig,
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    out: Path,
    ids: torch.Tensor,
    table: dict[str, dict[str, Any]],
) -> None:
    """Export ``model`` as each of ``q.gguf.types`` and add a row per file (measured under llama.cpp if it ran)."""
    measure = llama_cpp_decision(str(q.gguf.llama_cpp))
    stem = Path(str(model.config._name_or_path or "model")).name
    for t in q.gguf.types:
        info = export_gguf(model, tok, out / "gguf" / f"{stem}-{t}.gguf", str(t), name=stem)
        row = {"format": f"gguf, {info['architecture']}", "file_bytes": info["bytes"], **info}
        if measure:
            runner = llamacpp.LlamaCpp(Path(info["file"]), ev.text.context)
            row["perplexity"] = runner.perplexity(ids, ev.text.context, ev.text.stride)
            prompt = ids[: ev.speed.prompt_tokens].tolist()
            row["speed"] = {"1": runner.speed(prompt, ev.speed.new_tokens, ev.speed.repeats)}
        table[f"gguf-{t}"] = row


def llama_cpp_decision(setting: str) -> bool:
    """Whether the GGUF files are run by llama.cpp: ``auto`` when llama-cpp-python is installed (the setting and
    ``true``'s need of llama-cpp-python were checked by validate)."""
    if setting == "auto":
        have = llamacpp.available()
        why = "llama-cpp-python is installed" if have else "llama-cpp-python is not installed (`make bench`)"
        return decide("gguf_llama_cpp", "measure" if have else "skip", why) == "measure"
    return setting in ("true", "True")


def _weight_error(model: PreTrainedModel, quantized: PreTrainedModel, grids: dict) -> float:
    """||W - W'|| / ||W|| over every quantized weight together."""
    num = den = 0.0
    for name in grids:
        w = model.get_submodule(name).weight.detach().float()
        num += (w - quantized.get_submodule(name).weight.detach().float()).pow(2).sum().item()
        den += w.pow(2).sum().item()
    return round((num / max(den, 1e-30)) ** 0.5, 5)
