"""Quantization-aware distillation vs plain INT4 at equal steps, on SmolLM2-135M.

    python benchmarks/qad.py [--steps 20] [--batch 4] [--scheme channel|g64|g32]

The student is a copy of the packaged model, taught by the unquantized model (0.5·CE + 0.5·KL, T=1, lr 1e-4) on
Shakespeare blocks of 256 tokens for the same steps and data twice: once in float (then rounded to INT4,
round-to-nearest) and once fake-quantized on the INT4 grid throughout (straight-through; ``quantize.aware`` in the
recipes), then rounded to the same grid. A third row is the untrained model rounded. Perplexity of each INT4
model, and of the float models, over the held-out plays (2,048 tokens, windows of 256 moved by 128). INT4
per-channel by default: the grid where rounding costs the most. Writes benchmarks/results/qad.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TEACHER, fit, kd_blocks, table, write_result  # noqa: E402
from quality import held_out, ppl  # noqa: E402

from distillprune.distill import DistillSystem  # noqa: E402
from distillprune.losses import ForwardKL  # noqa: E402
from distillprune.models import load_model, load_tokenizer  # noqa: E402
from distillprune.quant.model import end_fake_quantized, quantize_model, train_fake_quantized  # noqa: E402
from distillprune.quant.settings import Scheme  # noqa: E402

SCHEMES = {
    "channel": Scheme(4, True, "channel"),
    "g64": Scheme(4, True, "group", 64),
    "g32": Scheme(4, True, "group", 32),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--scheme", default="channel", choices=sorted(SCHEMES))
    args = parser.parse_args()
    scheme = SCHEMES[args.scheme]
    torch.manual_seed(0)
    tok = load_tokenizer(TEACHER)
    teacher = load_model(TEACHER).eval()
    ids = held_out(tok)
    blocks = kd_blocks(tok, 256, args.batch * args.steps)
    untrained = copy.deepcopy(teacher)
    quantize_model(untrained, scheme)
    results = {"teacher_ppl": ppl(teacher, ids), "untrained_int4_ppl": ppl(untrained, ids)}
    del untrained
    rows = [["none (round the model as it is)", 0, results["teacher_ppl"], results["untrained_int4_ppl"], "-"]]
    for name, aware in (("plain: train in float, then round", False), ("aware: train on the grid (QAD)", True)):
        torch.manual_seed(0)
        student = copy.deepcopy(teacher).requires_grad_(True)
        if aware:
            train_fake_quantized(student, scheme)
        system = DistillSystem(student, teacher, ForwardKL(), kd_weight=0.5, lr=1e-4, warmup_steps=2)
        times = fit(system, blocks, args.batch)
        if aware:
            end_fake_quantized(student)
        student.eval()
        float_ppl = ppl(student, ids)
        quantize_model(student, scheme)
        int4_ppl = ppl(student, ids)
        results[name.split(":")[0]] = {
            "float_ppl": float_ppl,
            "int4_ppl": int4_ppl,
            "s_per_step": sum(times) / len(times),
        }
        rows.append([name, args.steps, float_ppl, int4_ppl, f"{sum(times) / len(times):.1f}"])
        del student, system
    gain = results["plain"]["int4_ppl"] - results["aware"]["int4_ppl"]
    title = (
        f"QAD vs plain {scheme.name} on SmolLM2-135M ({args.steps} steps of {args.batch}x256 tokens): "
        f"INT4 PPL {results['plain']['int4_ppl']:.2f} plain vs {results['aware']['int4_ppl']:.2f} aware ({gain:+.2f})"
    )
    header = ["training", "steps", "float PPL", f"{scheme.name} PPL", "s/step"]
    command = f"python benchmarks/qad.py --steps {args.steps} --batch {args.batch} --scheme {args.scheme}"
    write_result("qad", command, [table(title, header, rows)], {"scheme": scheme.name, **results})


if __name__ == "__main__":
    main()
