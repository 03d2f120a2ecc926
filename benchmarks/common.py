"""What the benchmarks share: the machine, tables, results files, peak memory, and the KD set-up they time.

The KD set-up is the ``logit_distill`` recipe's: the packaged SmolLM2-135M teacher, a 6-layer student made of its
layers [0, 6, 12, 18, 24, 29], Shakespeare in 256-token blocks, float32 (this CPU has no fast bfloat16).
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from distillprune.hardware import library_versions

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TEACHER = "smollm2-135m"
KEEP_LAYERS = [0, 6, 12, 18, 24, 29]


def machine() -> dict[str, Any]:
    """The machine a result was measured on."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and (m := re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text())):
        cpu = m.group(1).strip()
    mem = Path("/proc/meminfo")
    total = int(re.search(r"MemTotal:\s+(\d+)", mem.read_text()).group(1)) / 2**20 if mem.is_file() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(total, 1) if total else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        **library_versions(),
        "torch": torch.__version__,
    }


def table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table (also what the benchmark prints)."""
    cells = [[_cell(v) for v in row] for row in rows]
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def write_result(name: str, command: str, tables: list[str], data: dict[str, Any]) -> Path:
    """Print the tables and write ``benchmarks/results/<name>.json`` with the command, machine and data."""
    text = "\n\n".join(tables)
    print(text, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    record = {
        "benchmark": name,
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "tables_markdown": text,
        **data,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)
    print(f"written to {path.relative_to(ROOT)}", flush=True)
    return path


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (VmHWM), in MiB."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return float("nan")
    return int(re.search(r"VmHWM:\s+(\d+)", status.read_text()).group(1)) / 1024


def run_child(script: Path, args: list[str], timeout: int = 900) -> dict[str, Any]:
    """Run ``python script args`` in a fresh process (its own peak memory) and parse the JSON line it prints
    last."""
    done = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    if done.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def kd_models() -> tuple[Any, Any, Any]:
    """Tokenizer, frozen teacher and 6-layer student of the logit_distill recipe, float32."""
    from distillprune.models import load_model, load_student, load_tokenizer

    tok = load_tokenizer(TEACHER)
    teacher = load_model(TEACHER).eval()
    student = load_student(TEACHER, init="layer_drop", keep_layers=KEEP_LAYERS)
    return tok, teacher, student


def kd_blocks(tok: Any, seq_len: int, n: int, seed: int = 1234) -> torch.Tensor:
    """``n`` training blocks of ``seq_len`` Shakespeare tokens: [n, seq_len]."""
    from distillprune.data import TextDataModule

    dm = TextDataModule(tok, "shakespeare", seq_len=seq_len, batch_size=1, val_batches=None, seed=seed)
    dm.setup()
    return torch.tensor(dm.train_set.shuffle(seed=seed).select(range(n))["input_ids"])


def interleaved(measure: dict[str, Any], rounds: int) -> dict[str, dict[str, float]]:
    """Call each of ``measure``'s functions (name -> () -> a rate) once per round, in ABAB... order reversed every
    other round (AB BA AB ...), so that a drift of the machine's speed falls on all of them alike. Per name: the
    ``median``, ``min``, ``max`` and ``spread`` ((max - min) / median) of its rounds, and ``values``."""
    names = list(measure)
    values: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            values[name].append(float(measure[name]()))
    out = {}
    for name, vals in values.items():
        mid = statistics.median(vals)
        out[name] = {"median": mid, "min": min(vals), "max": max(vals),
                     "spread": (max(vals) - min(vals)) / mid if mid else float("inf"), "values": vals}  # fmt: skip
    return out


def effect(base: dict[str, float], other: dict[str, float]) -> dict[str, Any]:
    """``other``'s median over ``base``'s, and whether either one's spread exceeds the effect |ratio - 1|."""
    ratio = other["median"] / base["median"]
    return {"ratio": ratio, "noisy": max(base["spread"], other["spread"]) > abs(ratio - 1)}


def linear_params(model: torch.nn.Module) -> int:
    """Weights of the model's matmuls (a tied head counted as a matmul)."""
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def fit(system: Any, blocks: torch.Tensor, batch: int, store: Any = None) -> list[float]:
    """Train ``system`` one pass over ``blocks`` ([n, T]) in batches with Lightning (float32, CPU or one GPU,
    no logging or checkpoints); returns the seconds of every step. With a ``logit_store.LogitStore`` of the
    blocks, each batch carries their stored teacher targets (read in the step's data loading, before the clock)."""
    import lightning as L
    from torch.utils.data import DataLoader

    times: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            times.append(time.perf_counter() - self.t0)

    def rows(index: list[int]) -> dict[str, torch.Tensor]:
        ids = blocks[index]  # [B, T]
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        if store is not None:
            targets = [store.get(i) for i in index]
            out |= {
                f"teacher_topk_{k}": torch.cat([getattr(t, k) for t in targets]) for k in ("ids", "logprobs", "tail")
            }
        return out

    loader = DataLoader(list(range(len(blocks))), batch_size=batch, collate_fn=rows)
    trainer = L.Trainer(
        max_steps=len(blocks) // batch,
        accelerator="auto",
        devices=1,
        precision="32-true",
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[Timer()],
    )
    trainer.fit(system, train_dataloaders=loader)
    return times
