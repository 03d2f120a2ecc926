"""Logit-KD training step: distillprune vs TRL's GKDTrainer, tokens/s and peak memory, side by side.

    python benchmarks/kd_throughput.py [--batch 4] [--seq-len 256] [--steps 4] [--warmup 1]

Same teacher (SmolLM2-135M), student (its layers [0, 6, 12, 18, 24, 29]), batch, sequence length, float32 and the
same Shakespeare blocks for both. TRL runs GKDTrainer with beta=0 (forward KL, teacher || student), lmbda=0 (no
on-policy samples), temperature 1, gradient checkpointing off, AdamW; distillprune runs DistillSystem with the
same objective (kd_weight=1, ForwardKL, T=1) for each system.loss_impl, and ``distillprune:store`` trains from the
offline teacher store (``logit_store``: top-64 + tail bucket, built for the same blocks before the clock starts, its
build seconds and bytes reported; no teacher in the step or in memory). A step is forward (both models) + backward +
optimizer step, timed from each engine's step-begin hook to its step-end hook: the batch is fetched before the
clock starts, so data loading is not included (the blocks are pre-tokenised tensors in memory, for both engines);
tokens/s is batch x seq_len over the median of the timed steps after the warm-up. Each engine runs in a fresh
process, twice (in the order TRL, ours, ..., then reversed, so that a drift of the machine's speed does not
favour one side); peak MB is the peak resident memory (VmHWM) of its processes.
Writes benchmarks/results/kd_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fit, kd_blocks, kd_models, peak_rss_mb, run_child, table, write_result  # noqa: E402

ENGINES = ["trl", "distillprune:dense", "distillprune:fused_linear", "distillprune:store"]
STORE_K = 64  # distillprune:store: fused_linear from the offline teacher's top-64 (built first, not timed)
TARGET = 1.3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)  # one engine, in a child process
    args = parser.parse_args()
    if args.engine:
        print(json.dumps(run_engine(args.engine, args.batch, args.seq_len, args.steps, args.warmup)))
        return
    common = ["--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
    common += ["--warmup", str(args.warmup)]
    runs: dict[str, list[dict]] = {e: [] for e in ENGINES}
    for engine in ENGINES + ENGINES[::-1]:  # two rounds, the second in reverse: a drift of the machine cancels
        runs[engine].append(run_child(Path(__file__), [*common, "--engine", engine]))
    rows = {}
    for engine, done in runs.items():
        timed = [t for r in done for t in r["timed_s"]]
        step_s = statistics.median(timed)
        rows[engine] = {
            "tokens_per_s": round(args.batch * args.seq_len / step_s, 1),
            "step_s": round(step_s, 3),
            "timed_s": timed,
            "peak_mb": max(r["peak_mb"] for r in done),
        }
        if "store" in done[0]:
            rows[engine]["store"] = done[0]["store"]
    trl = rows["trl"]["tokens_per_s"]
    header = ["engine", "tokens/s", "s/step (median)", "peak MB", "vs TRL"]
    body = [
        [e, r["tokens_per_s"], r["step_s"], r["peak_mb"], f"{r['tokens_per_s'] / trl:.2f}x"] for e, r in rows.items()
    ]
    best = max(r["tokens_per_s"] for e, r in rows.items() if e != "trl") / trl
    title = (
        f"KD step, SmolLM2-135M -> 6-layer student, batch {args.batch} x {args.seq_len} tokens, float32: "
        f"best distillprune {best:.2f}x TRL GKDTrainer (target >= {TARGET}x: {'met' if best >= TARGET else 'MISSED'})"
    )
    tables = [table(title, header, body)]
    if store := rows.get("distillprune:store", {}).get("store"):
        tables.append(table(
            f"The offline teacher store of those blocks (k={STORE_K}, float16 log-probs + int32 ids + float32 tail)",
            ["blocks", "target positions", "build s", "build tokens/s", "MB", "bytes/token"],
            [[store["rows"], store["positions"], store["build_s"], round(store["positions"] / store["build_s"], 1),
              round(store["bytes"] / 2**20, 2), store["bytes_per_token"]]],
        ))  # fmt: skip
    command = "python benchmarks/kd_throughput.py " + " ".join(common)
    online = max(r["tokens_per_s"] for e, r in rows.items() if e not in ("trl", "distillprune:store"))
    data = {
        "rows": rows,
        "speedup_vs_trl": best,
        "store_vs_online": round(rows["distillprune:store"]["tokens_per_s"] / online, 3),
    }
    write_result("kd_throughput", command, tables, data)


def run_engine(engine: str, batch: int, seq_len: int, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    tok, teacher, student = kd_models()
    blocks = kd_blocks(tok, seq_len, batch * (steps + warmup))  # [n, T]
    times = (
        _trl(tok, teacher, student, blocks, batch)
        if engine == "trl"
        else _ours(engine, teacher, student, blocks, batch)
    )
    out = {"timed_s": [round(t, 3) for t in times[warmup:]], "peak_mb": round(peak_rss_mb())}
    return out | ({"store": store_info} if (store_info := getattr(times, "store", None)) else {})


def _ours(engine: str, teacher, student, blocks: torch.Tensor, batch: int) -> list[float]:
    from distillprune.distill import DistillSystem
    from distillprune.losses import ForwardKL

    impl = engine.split(":")[1]
    if impl == "store":
        return _from_store(teacher, student, blocks, batch)
    system = DistillSystem(student, teacher, ForwardKL(temperature=1.0), kd_weight=1.0, warmup_steps=0,
                           loss_impl=impl)  # fmt: skip
    return fit(system, blocks, batch)


class _Times(list):
    store: dict | None = None


def _from_store(teacher, student, blocks: torch.Tensor, batch: int) -> list[float]:
    """Build the blocks' store (timed apart), free the teacher, then train from the store with fused_linear."""
    import gc

    from distillprune.distill import DistillSystem
    from distillprune.logit_store import LocalTeacher, LogitStore, build
    from distillprune.losses import ForwardKL

    store = LogitStore(tempfile.mkdtemp(prefix="kd-store-"), {"k": STORE_K, "blocks": blocks.shape[0]})
    rows = [{"input_ids": b.tolist()} for b in blocks]
    built = build(store, LocalTeacher(teacher, STORE_K, pad_id=0), rows, list(range(len(rows))), batch_size=batch)
    info = {"rows": len(rows), "positions": store.positions(), "bytes": store.nbytes(), **built}
    info["bytes_per_token"] = round(info["bytes"] / info["positions"], 1)
    del teacher
    gc.collect()
    system = DistillSystem(student, None, ForwardKL(temperature=1.0), kd_weight=1.0, warmup_steps=0,
                           loss_impl="fused_linear")  # fmt: skip
    times = _Times(fit(system, blocks, batch, store=store))
    times.store = info
    return times


def _trl(tok, teacher, student, blocks: torch.Tensor, batch: int) -> list[float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *args, **kwargs) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kwargs) -> None:
            times.append(time.perf_counter() - self.t0)

    config = GKDConfig(
        output_dir=tempfile.mkdtemp(prefix="gkd-"),
        max_steps=len(blocks) // batch,
        per_device_train_batch_size=batch,
        learning_rate=3e-4,
        lmbda=0.0,
        beta=0.0,
        temperature=1.0,
        max_length=blocks.shape[1],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        max_grad_norm=1.0,
        report_to="none",
        save_strategy="no",
        logging_steps=1000,
        dataloader_num_workers=0,
    )
    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=Dataset.from_dict({"input_ids": blocks.tolist()}),
        data_collator=_collate,
        processing_class=tok,
        callbacks=[Timer()],
    )
    trainer.train()
    return times


def _collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    ids = torch.tensor([r["input_ids"] for r in rows])  # [B, T]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


if __name__ == "__main__":
    main()
