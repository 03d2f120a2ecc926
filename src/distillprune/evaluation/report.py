"""``output_dir/report.md``: the evaluation side by side, with PNG plots of training and pruning.

Plots (each only when its data exists): training curves (``train/loss``, ``train/kd``, ``train/ce`` from
``logs/metrics.csv``), validation perplexity over steps, per-layer widths after pruning, perplexity (and
generation speed) against the pruning ratio of a sweep. The same PNGs and the comparison table go to W&B when a
W&B logger is given.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
from lightning.pytorch.loggers import Logger, WandbLogger  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

Series = dict[str, list[tuple[int, float]]]  # column -> [(step, value)]


def read_log(csv_path: Path, columns: list[str]) -> Series:
    """The named columns of a Lightning CSV log as (step, value) points, rows without a value skipped."""
    series: Series = {c: [] for c in columns}
    if not csv_path.is_file():
        return series
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            for c in columns:
                if row.get(c) not in (None, "") and row.get("step") not in (None, ""):
                    series[c].append((int(float(row["step"])), float(row[c])))
    return series


def plot_training(csv_path: Path, folder: Path) -> dict[str, Path]:
    """``training_curves.png`` (loss, kd, ce) and ``val_ppl.png`` from a run's CSV log; returns what was drawn."""
    series = read_log(csv_path, ["train/loss", "train/kd", "train/ce", "val/ppl"])
    plots = {}
    curves = {k: v for k, v in series.items() if k.startswith("train/") and v}
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, points in curves.items():
            ax.plot(*zip(*points, strict=True), label=name, marker="." if len(points) < 30 else None)
        ax.set(xlabel="step", ylabel="loss (nats/token)", title="training loss")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
        plots["training_curves"] = _save(fig, folder / "training_curves.png")
    if series["val/ppl"]:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(*zip(*series["val/ppl"], strict=True), marker="o")
        ax.set(xlabel="step", ylabel="validation perplexity", title="validation perplexity", yscale="log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, which="both")
        plots["val_ppl"] = _save(fig, folder / "val_ppl.png")
    return plots


def plot_widths(dense: list[dict[str, int]], pruned: list[dict[str, int]], folder: Path) -> Path:
    """``layer_widths.png``: query heads, KV heads and MLP channels of every layer, before and after pruning."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    layers = list(range(len(pruned)))
    for ax, field, label in ((axes[0], "heads", "query heads"), (axes[1], "intermediate", "MLP channels")):
        ax.bar(layers, [w[field] for w in dense], color="lightgray", label="dense")
        ax.bar(layers, [w[field] for w in pruned], color="tab:blue", label="pruned")
        ax.set(xlabel="layer", ylabel=label, title=f"{label} per layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    axes[0].plot(layers, [w["kv_heads"] for w in pruned], "k_", markersize=12, label="KV heads (pruned)")
    axes[0].legend()
    return _save(fig, folder / "layer_widths.png")


def plot_sweep(rows: list[dict[str, float]], folder: Path) -> Path:
    """``pruning_sweep.png``: perplexity (log scale) and batch-1 tokens/s against the fraction of parameters
    removed."""
    fig, ax = plt.subplots(figsize=(7, 4))
    x = [r["removed_fraction"] for r in rows]
    ax.plot(x, [r["ppl"] for r in rows], "o-", color="tab:red", label="perplexity")
    ax.set(xlabel="fraction of parameters removed", ylabel="perplexity", yscale="log", title="pruning sweep")
    ax.grid(alpha=0.3, which="both")
    if all("tokens_per_s" in r for r in rows):
        speed = ax.twinx()
        speed.plot(x, [r["tokens_per_s"] for r in rows], "s--", color="tab:blue", label="tokens/s (batch 1)")
        speed.set_ylabel("tokens/s (batch 1)")
        speed.legend(loc="lower right")
    ax.legend(loc="upper left")
    return _save(fig, folder / "pruning_sweep.png")


def plot_quantization(rows: list[dict[str, Any]], folder: Path) -> Path:
    """``quantization.png``: perplexity against file size, one point per format (the unquantized model, each
    scheme, each GGUF type)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if r.get("ppl") is not None:
            ax.plot(r["file_mb"], r["ppl"], "o" if r["format"].startswith("gguf") else "s", label=r["name"])
    ax.set(xlabel="file size (MB)", ylabel="perplexity (held-out)", title="quantization: perplexity against size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, folder / "quantization.png")


def quantization_rows(evaluated: dict[str, Any], table: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per format: file MB, weights in memory, batch-1 tokens/s, PPL and mean zero-shot accuracy (GGUF
    rows: PPL and tokens/s under llama.cpp, when it ran)."""
    rows = []
    for name, info in table.items():
        e = evaluated.get(name, info)
        zero_shot = [t["acc"] for t in e.get("zero_shot", {}).values()]
        rows.append({
            "name": name,
            "format": info["format"],
            "file_mb": round(info["file_bytes"] / 2**20, 2),
            "weights_mb": e.get("weights_mb", round(info["file_bytes"] / 2**20, 1) if "gguf" in name else None),
            "tokens_per_s": _get(e, ("speed", "1", "tokens_per_s")),
            "ppl": _get(e, ("perplexity", "ppl")),
            "zero_shot": round(sum(zero_shot) / len(zero_shot), 4) if zero_shot else None,
            "types": info.get("tensor_types"),
        })  # fmt: skip
    return rows


def quantization_table(rows: list[dict[str, Any]]) -> list[str]:
    """The quantization section of ``report.md``: the rows as a markdown table (its plot follows with the others)."""
    lines = ["## quantization", "", "Hugging Face rows run in PyTorch (quantized weights dequantized on load, so "
             "they take the memory of their dtype); GGUF rows run in llama.cpp (weights in memory ~ the file). "
             "Tokens/s: greedy, batch 1.", ""]  # fmt: skip
    lines += ["| format | file MB | weights MB | tokens/s (b1) | PPL | zero-shot acc | tensor types |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for r in rows:
        types = ", ".join(f"{k} {v}" for k, v in (r["types"] or {}).items())
        lines.append(
            f"| {r['name']} ({r['format']}) | {r['file_mb']:.1f} | {_fmt(r['weights_mb'], '{:.0f}')} | "
            f"{_fmt(r['tokens_per_s'], '{:.1f}')} | {_fmt(r['ppl'], '{:.2f}')} | {_fmt(r['zero_shot'], '{:.3f}')} | "
            f"{types} |"
        )
    return lines


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------- report

_COLUMNS = [  # (header, path into a model's evaluation, format)
    ("params", ("params",), "{:,}"),
    ("FLOPs/token", ("flops_per_token",), "{:.3g}"),
    ("PPL", ("perplexity", "ppl"), "{:.2f}"),
    ("weights MB", ("weights_mb",), "{:.0f}"),
]


def comparison_rows(evaluation: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The side-by-side table: one row per model, the speed of every batch size and every zero-shot task."""
    models = evaluation["models"]
    first = next(iter(models.values()))
    batches = list(first.get("speed", {}))
    tasks = list(first.get("zero_shot", {}))
    header = ["model", *(c[0] for c in _COLUMNS)]
    header += [f"{h} (batch {b})" for b in batches for h in ("tokens/s", "TTFT ms", "peak MB")]
    chance = {t: first["zero_shot"][t].get("chance") for t in tasks}
    header += [
        f"{t} {m}" + (f" (chance {chance[t]:.2f})" if chance[t] else "") for t in tasks for m in ("acc", "acc_norm")
    ]
    rows = []
    for name, ev in models.items():
        row = [name] + [_fmt(_get(ev, path), fmt) for _, path, fmt in _COLUMNS]
        for b in batches:
            s = ev["speed"][b]
            row += [_fmt(s["tokens_per_s"], "{:.1f}"), _fmt(s["ttft_ms"], "{:.0f}"), _fmt(s["peak_mb"], "{:.0f}")]
        for t in tasks:
            z = ev["zero_shot"][t]
            row += [f"{z['acc']:.3f} ± {z['acc_stderr']:.3f}", f"{z['acc_norm']:.3f} ± {z['acc_norm_stderr']:.3f}"]
        rows.append(row)
    return header, rows


def write_report(
    out: Path,
    title: str,
    evaluation: dict[str, Any],
    plots: dict[str, Path],
    notes: list[str],
    sweep: list[dict[str, float]] | None = None,
    sections: list[str] | None = None,
) -> Path:
    """Write ``out/report.md`` (atomically): settings, the comparison table, notes, the sweep, further
    ``sections`` (markdown lines) and the plots."""
    s = evaluation["settings"]
    lines = [f"# {title}", ""]
    lines += [
        f"Perplexity: {s['text_tokens']:,} tokens of held-out text ({s['text_source']}), windows of "
        f"{s['context']} tokens moved by {s['stride']} (each scored token sees at least "
        f"{s['context'] - s['stride']} tokens before it, except in the first window). FLOPs/token: forward, "
        f"at the mean position of a {s['context']}-token window.",
    ]
    if s.get("batch_sizes"):
        lines.append(
            f"Generation: greedy, KV cache, {s['prompt_tokens']}-token prompts, {s['new_tokens']} new tokens, median "
            f"of {s['repeats']} runs; tokens/s counts the new tokens of the whole batch over the whole call; TTFT "
            f"is prefill plus the first token; peak MB is {s['memory']}."
        )
    if s.get("zero_shot_tasks"):
        lines.append(
            f"Zero-shot (lm-eval-harness, local task definitions under zero_shot/tasks): acc and acc_norm "
            f"(length-normalised) ± binomial standard error, {s['zero_shot_n']} items per task; chance is the "
            f"expected accuracy of a uniform guess among the choices."
        )
    lines.append(f"Device: {s['device']}, dtype {s['dtype']}.")
    header, rows = comparison_rows(evaluation)
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    if sweep:
        lines += ["", "## pruning sweep (same importance scores, no recovery)", ""]
        lines += ["| ratio | params | removed | val PPL | tokens/s (batch 1) |", "|---|---|---|---|---|"]
        lines += [
            f"| {r['ratio']:.2f} | {r['params']:,} | {r['removed_fraction']:.1%} | {r['ppl']:.2f} | "
            f"{r['tokens_per_s']:.1f} |"
            for r in sweep
        ]
    if sections:
        lines += ["", *sections]
    for name, path in plots.items():
        lines += ["", f"## {name.replace('_', ' ')}", "", f"![{name}]({path.relative_to(out).as_posix()})"]
    path = out / "report.md"
    tmp = out / "report.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def log_to_wandb(loggers: list[Logger], evaluation: dict[str, Any], plots: dict[str, Path]) -> None:
    """The comparison table and the PNGs to every W&B logger among ``loggers``."""
    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        header, rows = comparison_rows(evaluation)
        logger.log_table("evaluation/comparison", columns=header, data=rows)
        for name, path in plots.items():
            logger.log_image(f"report/{name}", images=[str(path)])


def _get(d: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        d = d.get(key) if isinstance(d, dict) else None
    return d


def _fmt(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)
