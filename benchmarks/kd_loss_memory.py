"""Peak memory and time of the KD objective, forward + backward: dense vs chunked vs fused-linear.

    python benchmarks/kd_loss_memory.py [--tokens 8192] [--grid 576:49152,2048:49152,576:128256,2048:128256]

The objective is Liger's benchmark's: 0.5·CE + 0.5·JSD(beta 0.5), student and teacher with the same hidden size,
float32 on the CPU. ``dense`` computes both models' logits [N, V] with a matmul and the dense loss; ``chunked``
computes the same logits and the chunked loss; ``fused_linear`` starts from the hidden states and head weights.
Each row runs in a fresh process; ``peak_mb`` is the peak resident memory above what the inputs (hidden states and
head weights) already take, read from the kernel's high-water mark (VmHWM, reset before the run). A row whose
dense estimate does not fit in the memory available is not run and says so. Writes
benchmarks/results/kd_loss_memory.json with rows {impl, vocab, hidden, tokens, peak_mb, time_s}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from distillprune.losses import JSD
from distillprune.objective import Objective

RESULTS = Path(__file__).resolve().parent / "results"
IMPLS = ("dense", "chunked", "fused_linear")
DENSE_BYTES_PER_LOGIT = 4 * 14  # measured: about fourteen float32 [N, V] tensors at the dense peak (JSD)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--grid", default="576:49152,2048:49152,576:128256,2048:128256", help="hidden:vocab,...")
    parser.add_argument("--one", nargs=4, metavar=("IMPL", "VOCAB", "HIDDEN", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        impl, vocab, hidden, tokens = args.one
        print(json.dumps(_measure(impl, int(vocab), int(hidden), int(tokens))))
        return

    rows = []
    for cell in args.grid.split(","):
        hidden, vocab = (int(x) for x in cell.split(":"))
        fits = args.tokens  # where dense cannot run at --tokens, all three also run at the largest N it fits
        while fits > 256 and _dense_mb(fits, vocab) > 0.85 * _available_mb():
            fits //= 2
        for tokens in dict.fromkeys([args.tokens, fits]):
            for impl in IMPLS:
                if impl == "dense" and _dense_mb(tokens, vocab) > 0.85 * _available_mb():
                    note = f"not run: needs ~{_dense_mb(tokens, vocab):,.0f} MB, {_available_mb():,.0f} free"
                    row = _row(impl, vocab, hidden, tokens, note=note)
                else:
                    row = _run_child(impl, vocab, hidden, tokens)
                rows.append(row)
                print(_format(row), flush=True)
    _summary(rows)
    RESULTS.mkdir(exist_ok=True)
    out = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "objective": "0.5*CE + 0.5*JSD(0.5), float32, forward + backward",
        "rows": rows,
    }
    (RESULTS / "kd_loss_memory.json").write_text(json.dumps(out, indent=2))
    print(f"written to {RESULTS / 'kd_loss_memory.json'}")


def _measure(impl: str, vocab: int, hidden: int, tokens: int) -> dict:
    g = torch.Generator().manual_seed(0)
    h_s = (torch.randn(tokens, hidden, generator=g)).requires_grad_(True)  # [N, H]
    w_s = (torch.randn(vocab, hidden, generator=g) * hidden**-0.5).requires_grad_(True)  # [V, H]
    h_t = torch.randn(tokens, hidden, generator=g)
    w_t = torch.randn(vocab, hidden, generator=g) * hidden**-0.5
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    objective = Objective(JSD(0.5), impl)
    base = _reset_peak()
    start = time.perf_counter()
    if impl == "fused_linear":
        total, _, _ = objective.fused_linear(h_s, w_s, h_t, w_t, targets, 0.5)
    else:
        with torch.no_grad():
            teacher_logits = h_t @ w_t.T  # [N, V]
        total, _, _ = objective(h_s @ w_s.T, teacher_logits, targets, 0.5)
    total.backward()
    seconds = time.perf_counter() - start
    peak_mb = (_status_kb("VmHWM") - base) / 1024
    return {"impl": impl, "vocab": vocab, "hidden": hidden, "tokens": tokens, "peak_mb": round(peak_mb, 1),
            "time_s": round(seconds, 3), "loss": round(total.item(), 6)}  # fmt: skip


def _row(impl: str, vocab: int, hidden: int, tokens: int, **values) -> dict:
    return {"impl": impl, "vocab": vocab, "hidden": hidden, "tokens": tokens, "peak_mb": None, "time_s": None,
            **values}  # fmt: skip


def _dense_mb(tokens: int, vocab: int) -> float:
    return DENSE_BYTES_PER_LOGIT * tokens * vocab / 2**20


def _run_child(impl: str, vocab: int, hidden: int, tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--one", impl, str(vocab), str(hidden), str(tokens)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["killed"])[-1]
        return _row(impl, vocab, hidden, tokens, note=f"failed ({done.returncode}): {why}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _reset_peak() -> int:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    return _status_kb("VmHWM")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def _format(row: dict) -> str:
    peak = f"{row['peak_mb']:>10,.0f}" if row["peak_mb"] is not None else f"{'-':>10}"
    secs = f"{row['time_s']:>8.2f}" if row["time_s"] is not None else f"{'-':>8}"
    return f"{row['impl']:<13}{row['vocab']:>8}{row['hidden']:>7}{row['tokens']:>7}{peak}{secs}  {row.get('note', '')}"


def _summary(rows: list[dict]) -> None:
    print(f"\n{'vocab':>8}{'hidden':>7}{'tokens':>7}  fused vs dense: memory saved, time ratio")
    for r in rows:
        if r["impl"] != "fused_linear":
            continue
        key = (r["vocab"], r["hidden"], r["tokens"])
        dense = next(d for d in rows if d["impl"] == "dense" and (d["vocab"], d["hidden"], d["tokens"]) == key)
        where = f"{r['vocab']:>8}{r['hidden']:>7}{r['tokens']:>7}"
        if dense["peak_mb"] and r["peak_mb"] is not None:
            saved, ratio = 1 - r["peak_mb"] / dense["peak_mb"], r["time_s"] / dense["time_s"]
            print(f"{where}  {saved:.1%} less memory, {ratio:.2f}x the time")
        else:
            print(f"{where}  dense not measured ({dense.get('note', '')})")


if __name__ == "__main__":
    print(f"{'impl':<13}{'vocab':>8}{'hidden':>7}{'tokens':>7}{'peak MB':>10}{'time s':>8}")
    main()
