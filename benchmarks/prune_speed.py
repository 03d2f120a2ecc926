"""Generation speed of pruned vs dense SmolLM2-135M at 10 / 20 / 30 / 50% of parameters removed.

    python benchmarks/prune_speed.py [--ratios 0.1,0.2,0.3,0.5] [--repeats 3] [--round-to 1]

The prune_lora recipe's pruning (Taylor importance from 8 calibration blocks, GQA-aware, uniform widths over
layers 3-26), scored once and applied to a copy of the dense model per ratio, no recovery. Each model generates 32
greedy tokens with the KV cache after a 64-token prompt at batch 1 and batch 16; dense and pruned runs interleave
(AB BA AB ..., ``repeats`` rounds: ``common.interleaved``) so that a drift of the machine's speed does not show
up as a speed-up; each cell is the median ± the spread (max - min over the median), and a speed-up smaller than
either spread is marked "within the spread". Target: >= 1.25x at 20% (LLM-Pruner reports 1.18x on LLaMA-7B). Writes
benchmarks/results/prune_speed.json.
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TEACHER, effect, interleaved, kd_blocks, table, write_result  # noqa: E402

from distillprune.evaluation.metrics import count_params  # noqa: E402
from distillprune.evaluation.speed import generation_speed  # noqa: E402
from distillprune.models import load_model, load_tokenizer  # noqa: E402
from distillprune.prune.groups import layer_widths  # noqa: E402
from distillprune.prune.importance import score  # noqa: E402
from distillprune.prune.surgery import apply, plan, select  # noqa: E402

LAYERS = list(range(3, 27))
TARGET = 1.25


def pruned_copy(dense, scores, ratio: float, round_to: int = 1):
    model = copy.deepcopy(dense)
    checked = plan(model, ratio, LAYERS, "q_per_group", round_to, ("heads", "channels"))
    apply(model, select(scores, checked, layer_widths(model), "q_per_group", True, round_to))
    return model


def tokens_per_s(model, prompts: torch.Tensor, batch: int, pad: int | None) -> float:
    """One timed generation (after its warm-up) at ``batch``: new tokens per second."""
    return generation_speed(model, prompts, [batch], 32, 1, pad)[str(batch)]["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.1,0.2,0.3,0.5")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--round-to", type=int, default=1, help="kept MLP channels rounded to a multiple (prune.round_to)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    tok = load_tokenizer(TEACHER)
    dense = load_model(TEACHER).eval()
    calibration = [{"input_ids": b.unsqueeze(0)} for b in kd_blocks(tok, 128, 8)]
    scores, _ = score(dense, calibration, "taylor", LAYERS, "sum", 1234)
    prompts = kd_blocks(tok, 64, 16, seed=7)  # [16, 64]
    rows, data = [], []
    for ratio in (float(r) for r in args.ratios.split(",")):
        model = pruned_copy(dense, scores, ratio, args.round_to)
        removed = 1 - count_params(model) / count_params(dense)
        speeds = {}
        for bs in (1, 16):
            runs = {name: functools.partial(tokens_per_s, m, prompts, bs, tok.pad_token_id)
                    for name, m in (("dense", dense), ("pruned", model))}  # fmt: skip
            timed = interleaved(runs, args.repeats)
            up = effect(timed["dense"], timed["pruned"])
            speeds[bs] = {**timed, "speedup": up["ratio"], "noisy": up["noisy"]}
        cell = lambda s: f"{s['median']:.1f} ±{s['spread']:.0%}"  # noqa: E731 - median and (max - min) / median
        up = lambda s: f"{s['speedup']:.2f}x" + (" (within the spread)" if s["noisy"] else "")  # noqa: E731
        rows.append([
            f"{ratio:.0%}", f"{removed:.1%}", count_params(model),
            cell(speeds[1]["dense"]), cell(speeds[1]["pruned"]), up(speeds[1]),
            cell(speeds[16]["dense"]), cell(speeds[16]["pruned"]), up(speeds[16]),
        ])  # fmt: skip
        data.append({"ratio": ratio, "removed_fraction": removed, "params": count_params(model), "speed": speeds})
        del model
    at20 = next((d["speed"] for d in data if abs(d["ratio"] - 0.2) < 1e-9), None)
    verdict = ""
    if at20 is not None:
        marks = [f"{at20[b]['speedup']:.2f}x at batch {b}" for b in (1, 16)]
        met = ["met" if at20[b]["speedup"] >= TARGET else "MISSED" for b in (1, 16)]
        verdict = f"; at 20%: {', '.join(marks)} (target >= {TARGET}x: {met[0]} / {met[1]})"
    rounding = f", MLP widths rounded to {args.round_to}" if args.round_to > 1 else ""
    title = f"Pruned vs dense generation, SmolLM2-135M ({count_params(dense):,} params), float32{rounding}{verdict}"
    header = ["ratio", "removed", "params", "dense tok/s b1", "pruned tok/s b1", "speed-up b1",
              "dense tok/s b16", "pruned tok/s b16", "speed-up b16"]  # fmt: skip
    command = (
        f"python benchmarks/prune_speed.py --ratios {args.ratios} --repeats {args.repeats} --round-to {args.round_to}"
    )
    write_result(
        "prune_speed",
        command,
        [table(title, header, rows)],
        {"rows": data, "speedup_at_20": at20 and {b: at20[b]["speedup"] for b in (1, 16)}},
    )


if __name__ == "__main__":
    main()
