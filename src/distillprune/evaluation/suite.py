"""Evaluation of compressed models side by side.

``evaluate_models`` measures each model the same way: parameters, forward FLOPs per token, weights in memory,
perplexity over held-out text in strided windows, generation tokens/s / time to first token / peak memory at
each batch size with the KV cache, and lm-eval zero-shot accuracy on the packaged tasks. Every training recipe
ends with ``evaluate_stage`` (teacher vs student, or dense vs pruned vs recovered), which also writes
``report.md`` with its plots; ``python train.py recipe=evaluate model=NAME [baseline=NAME]`` does the same for
any saved models (``distillprune.recipes.evaluate``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distillprune.data import document_text, leading_bos, load_documents, split_documents
from distillprune.errors import UserError
from distillprune.evaluation import quantized
from distillprune.evaluation.metrics import count_params, flops_per_token, strided_perplexity
from distillprune.evaluation.report import (
    log_to_wandb,
    plot_quantization,
    plot_sweep,
    plot_training,
    plot_widths,
    quantization_rows,
    quantization_table,
    write_report,
)
from distillprune.evaluation.speed import generation_speed, weights_mb
from distillprune.evaluation.zeroshot import run_zero_shot

log = logging.getLogger(__name__)


def held_out_ids(ev: DictConfig, tok: PreTrainedTokenizerBase, data: DictConfig | None, seed: int) -> torch.Tensor:
    """Token ids of the held-out documents of ``ev.text.source`` (null: the recipe's ``data.source``), split off
    with the data's ``val_fraction`` and ``seed`` so that a recipe is scored on what it did not train on; at most
    ``ev.text.max_tokens`` of them, documents joined by a blank line."""
    text = ev.text
    source = text.source or (data.source if data is not None else None)
    if source is None:
        raise UserError("evaluate.text.source is not set and the recipe has no data.source to hold text out of")
    field = data.get("text_field", "text") if data is not None else "text"
    fraction = data.get("val_fraction", 0.05) if data is not None and not text.source else text.val_fraction
    _, held_out = split_documents(load_documents(source, field), fraction, seed)
    joined = "\n\n".join(_plain_text(d, field) for d in held_out)
    ids = tok(joined[: 12 * text.max_tokens], add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids[: text.max_tokens]  # [N]


def evaluate_models(
    models: dict[str, PreTrainedModel],
    tok: PreTrainedTokenizerBase,
    ev: DictConfig,
    ids: torch.Tensor,
    out: Path,
    seed: int,
) -> dict[str, Any]:
    """Measure every model the same way; ``{"settings": ..., "models": {name: {...}}}``."""
    speed, zs = ev.speed, ev.zero_shot
    first = next(iter(models.values()))
    device = next(first.parameters()).device
    prompts = _prompt_windows(ids, max(speed.batch_sizes, default=0), speed.prompt_tokens)
    settings = {
        "text_source": ev.text.source or "the recipe's held-out data",
        "text_tokens": int(ids.numel()),
        "context": ev.text.context,
        "stride": ev.text.stride,
        "batch_sizes": list(speed.batch_sizes),
        "prompt_tokens": speed.prompt_tokens,
        "new_tokens": speed.new_tokens,
        "repeats": speed.repeats,
        "memory": "torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else "the weights plus the larger of the KV cache at the end and the rise of the resident memory",
        "zero_shot_tasks": list(zs.tasks),
        "zero_shot_n": zs.n,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads",
        "dtype": str(first.dtype).removeprefix("torch."),
    }
    results: dict[str, Any] = {}
    bos = leading_bos(tok)  # the models share the tokenizer: BOS before every window, or for none
    for name, model in models.items():
        t0 = time.perf_counter()
        row: dict[str, Any] = {
            "params": count_params(model),
            "flops_per_token": flops_per_token(model, ev.text.context),
            "weights_mb": round(weights_mb(model), 1),
            "perplexity": strided_perplexity(model, ids, ev.text.context, ev.text.stride, bos),
        }
        if speed.batch_sizes:
            row["speed"] = generation_speed(
                model, prompts, list(speed.batch_sizes), speed.new_tokens, speed.repeats, tok.pad_token_id
            )
        if zs.tasks:
            row["zero_shot"] = run_zero_shot(
                model, tok, out / "zero_shot" / "tasks", list(zs.tasks), zs.n, seed, zs.val_fraction, zs.batch_size
            )
        row["eval_s"] = round(time.perf_counter() - t0, 1)
        log.info("evaluated %s: %s", name, row)
        results[name] = row
    return {"settings": settings, "models": results}


def evaluate_stage(
    cfg: DictConfig,
    models: dict[str, PreTrainedModel],
    tok: PreTrainedTokenizerBase,
    out: Path,
    metrics: dict[str, Any],
    loggers: list[Logger] | None = None,
) -> None:
    """A recipe's last stage: evaluate ``models`` side by side into ``metrics["evaluation"]`` and write
    ``report.md`` with the plots of the run (training curves, widths, sweep) next to it."""
    ev, q = cfg.evaluate, cfg.get("quantize")
    table: dict[str, dict[str, Any]] = {}
    if quantized.wanted(q):  # the last model (the trained one) beside its quantized copies
        label, last = list(models.items())[-1]
        extra, table = quantized.copies(q, label, last, tok, out, cfg.seed)
        models = {**models, **extra}
    ids = held_out_ids(ev, tok, cfg.get("data"), cfg.seed)
    metrics["evaluation"] = evaluate_models(models, tok, ev, ids, out, cfg.seed)
    if "control" in models and "recovered" in models:
        metrics["fair_ratio"] = fair_ratio(metrics)
    plots = plot_training(out / "logs" / "metrics.csv", out / "report")
    sections = []
    if table:
        quantized.gguf_rows(q, ev, last, tok, out, ids, table)
        metrics["quantization"] = table
        rows = quantization_rows(metrics["evaluation"]["models"], table)
        plots["perplexity_against_size"] = plot_quantization(rows, out / "report")
        sections = quantization_table(rows)
    if metrics.get("widths") and metrics.get("widths_dense"):  # not after depth pruning: other layers
        plots["layer_widths"] = plot_widths(metrics["widths_dense"], metrics["widths"], out / "report")
    if metrics.get("sweep"):
        plots["pruning_sweep"] = plot_sweep(metrics["sweep"], out / "report")
    noted = ("fair_ratio", "steps", "speedup", "sparsity", "prune_s", "removed_layers")
    notes = [f"{k}: {v}" for k, v in metrics.items() if k in noted]
    if "accuracy" in metrics:  # in-context distillation's task accuracies
        notes.insert(0, accuracy_note(metrics))
    write_report(out, f"{cfg.recipe}: {out.name}", metrics["evaluation"], plots, notes, metrics.get("sweep"), sections)
    log_to_wandb(loggers or [], metrics["evaluation"], plots)


def _plain_text(doc: tuple[str, Any], field: str) -> str:
    """A document's text; a row without ``field`` (prompt/response or messages data) is its string values, joined."""
    content = doc[1]
    if isinstance(content, dict) and field not in content:
        values = [v for v in content.values() if isinstance(v, str)]
        values += [m["content"] for m in content.get("messages", []) if isinstance(m, dict) and "content" in m]
        return "\n".join(values)
    return document_text(doc, field)


def _prompt_windows(ids: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """``n`` prompts of ``length`` consecutive tokens each, cut from ``ids`` (repeated if it is too short)."""
    need = n * length
    if need == 0:
        return ids[:0].reshape(0, max(length, 1))
    reps = -(-need // max(ids.numel(), 1))
    return ids.repeat(reps)[:need].reshape(n, length)  # [n, length]


def accuracy_note(metrics: dict[str, Any]) -> str:
    """One line: each task accuracy ± its standard error, with the task's chance level and item count."""
    se, ex = metrics["accuracy_se"], metrics["examples"]
    parts = [f"{name} {value:.3f} ± {se[name]:.3f}" for name, value in metrics["accuracy"].items()]
    return f"accuracy on {metrics['task']} ({ex['eval']} items, chance {metrics['chance']:.3f}): " + ", ".join(parts)


def fair_ratio(metrics: dict[str, Any]) -> dict[str, float]:
    """Recovered / dense-control perplexity: ``val_ppl`` on the recovery data's held-out documents (in-domain),
    ``eval_ppl`` on the evaluation text (``evaluate.text.source``; disjoint from the recovery data when it is
    another corpus). 1.0 means that pruning cost nothing that the same training could not give the dense model."""
    ratios = {}
    val = metrics.get("val_ppl", {})
    if "recovered" in val and "control" in val:
        ratios["val_ppl"] = round(val["recovered"] / val["control"], 3)
    rows = metrics["evaluation"]["models"]
    if "perplexity" in rows["recovered"] and "perplexity" in rows["control"]:
        ratios["eval_ppl"] = round(rows["recovered"]["perplexity"]["ppl"] / rows["control"]["perplexity"]["ppl"], 3)
    return ratios
