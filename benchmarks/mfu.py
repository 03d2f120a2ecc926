"""Model FLOPs utilisation of the KD training step, as a fraction of this machine's measured matmul rate.

    python benchmarks/mfu.py [--batch 4] [--seq-len 256] [--steps 3]

In one process: first the peak, the best of several float32 square matmuls (torch.mm, the threads the step
uses) at sizes 1024-4096; then distillprune's KD step (the logit_distill set-up: SmolLM2-135M teacher, 6-layer
student, ForwardKL, the fused-linear loss that system.loss_impl=auto picks) timed after one warm-up step. FLOPs per
step are counted from the shapes: student forward + backward = 3 x forward, teacher forward only; a forward is
2 FLOPs per matmul weight and token plus the causal attention (4 x query width x mean keys per layer). The
loss's element-wise work is not counted (it is memory-bound; counting it would flatter the result). The
denominator is the measured float32 ``torch.mm`` rate, not a datasheet peak: no specification peak is known for
this CPU (its vendor publishes none per core count and clock), so the figure says how much of the matmul rate the
step reaches, not how much of the silicon's theoretical FLOP/s. Writes benchmarks/results/mfu.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fit, kd_blocks, kd_models, table, write_result  # noqa: E402

from distillprune.evaluation.metrics import flops_per_token  # noqa: E402


def matmul_peak(sizes: tuple[int, ...] = (1024, 2048, 3072, 4096), repeats: int = 3) -> dict[int, float]:
    """FLOP/s of float32 ``torch.mm`` at each square size (best of ``repeats``)."""
    out = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)  # warm-up
        best = min(_timed(lambda a=a, b=b: torch.mm(a, b)) for _ in range(repeats))
        out[n] = 2 * n**3 / best
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    from distillprune.distill import DistillSystem
    from distillprune.losses import ForwardKL

    peaks = matmul_peak()
    peak = max(peaks.values())
    tok, teacher, student = kd_models()
    tokens = args.batch * args.seq_len
    flops = tokens * (3 * flops_per_token(student, args.seq_len) + flops_per_token(teacher, args.seq_len))
    blocks = kd_blocks(tok, args.seq_len, args.batch * (args.steps + 1))
    # the fused-linear objective: what the recipes' system.loss_impl=auto runs on one device
    system = DistillSystem(student, teacher, ForwardKL(), kd_weight=1.0, warmup_steps=0, loss_impl="fused_linear")
    step_s = statistics.median(fit(system, blocks, args.batch)[1:])
    achieved = flops / step_s
    rows = [[f"torch.mm {n}x{n} float32", f"{f / 1e9:.1f}", "-", "-"] for n, f in peaks.items()]
    rows.append(["KD step (fused-linear loss)", f"{achieved / 1e9:.1f}", f"{flops / 1e9:.0f}", f"{step_s:.2f}"])
    title = (
        f"KD step FLOP/s as a fraction of the measured float32 matmul rate (not a datasheet peak), batch "
        f"{args.batch} x {args.seq_len}, {torch.get_num_threads()} threads: {achieved / 1e9:.1f} / {peak / 1e9:.1f} "
        f"GFLOP/s = {achieved / peak:.1%}"
    )
    header = ["what", "GFLOP/s", "GFLOP per step", "s/step"]
    command = f"python benchmarks/mfu.py --batch {args.batch} --seq-len {args.seq_len} --steps {args.steps}"
    data = {
        "peak_basis": "measured float32 torch.mm rate (no datasheet peak known)",
        "peak_flops": peak,
        "matmul_flops": peaks,
        "step_flops": flops,
        "step_s": step_s,
        "mfu": achieved / peak,
    }
    write_result("mfu", command, [table(title, header, rows)], data)


if __name__ == "__main__":
    main()
