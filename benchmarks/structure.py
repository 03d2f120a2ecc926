"""Width vs depth pruning vs KV-head merging on SmolLM2-135M (or --model gemma3-270m), no recovery: size, PPL,
generation speed at a short and a long context, KV-cache bytes per token.

    python benchmarks/structure.py [--model smollm2-135m] [--ratio 0.2] [--context 1024] [--repeats 3]

Rows: the dense model; width pruning at --ratio (Taylor importance, GQA-aware q_per_group, uniform widths) over
layers 3..n-4 (LLM-Pruner's choice: a per-layer export) and over all layers (a stock config); depth pruning of
as many whole layers as remove about the same share of parameters, ranked by block influence (cosine) and by
the PPL without each layer; KV heads merged to 1 (MQA, mean-pooled). All from the same 8 calibration blocks of
128 tokens. PPL: held-out Shakespeare in windows of 256 moved by 128 (the evaluate recipe's). Speed: greedy
decoding of 32 tokens at batch 1 after a 64-token prompt and after a --context-token prompt, the dense model
measured again beside each row (alternating) so that drift does not read as a speed-up. Depth should come close
to the parameter ratio in speed-up, where width did not (1.00x at 20% in prune_speed). Writes
benchmarks/results/structure.json (another --model: structure-<model>.json).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TEACHER, kd_blocks, table, write_result  # noqa: E402

from distillprune.data import leading_bos  # noqa: E402
from distillprune.evaluation.metrics import count_params, strided_perplexity  # noqa: E402
from distillprune.evaluation.speed import generation_speed  # noqa: E402
from distillprune.evaluation.suite import held_out_ids  # noqa: E402
from distillprune.models import load_model, load_tokenizer  # noqa: E402
from distillprune.prune.depth import block_importance, candidates, choose, remove_layers  # noqa: E402
from distillprune.prune.groups import layer_widths  # noqa: E402
from distillprune.prune.importance import score  # noqa: E402
from distillprune.prune.kv_merge import kv_bytes_per_token, merge_kv_heads  # noqa: E402
from distillprune.prune.surgery import apply, plan, select  # noqa: E402

CONTEXT, STRIDE, NEW = 256, 128, 32


def width(dense, calibration, ratio: float, layers: list[int]):
    model = copy.deepcopy(dense)
    scores, _ = score(model, calibration, "taylor", layers, "sum", 1234)
    checked = plan(model, ratio, layers, "q_per_group")
    return apply(model, select(scores, checked, layer_widths(model), "q_per_group", True))


def depth(dense, calibration, ratio: float, method: str):
    n = dense.config.num_hidden_layers
    per_layer = (count_params(dense) - count_params(remove_layers(copy.deepcopy(dense), list(range(1, n))))) / (n - 1)
    remove = max(1, round(ratio * count_params(dense) / per_layer))
    model = copy.deepcopy(dense)
    drop = choose(block_importance(model, calibration, method), remove, candidates(n, remove, True, True))
    return remove_layers(model, drop), drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=TEACHER)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    tok = load_tokenizer(args.model)
    dense = load_model(args.model).eval()
    n = dense.config.num_hidden_layers
    calibration = [{"input_ids": b.unsqueeze(0)} for b in kd_blocks(tok, 128, 8)]
    ev = OmegaConf.create({"text": {"source": "shakespeare", "val_fraction": 0.05, "max_tokens": args.tokens}})
    ids = held_out_ids(ev, tok, None, 1234)
    long_prompt = kd_blocks(tok, args.context, 1, seed=7)  # [1, context]
    short_prompt = long_prompt[:, :64]
    rows = {"dense": (dense, "")}
    rows[f"width {args.ratio:.0%}, layers 3..{n - 4} (per-layer)"] = (
        width(dense, calibration, args.ratio, list(range(3, n - 3))),
        "",
    )
    rows[f"width {args.ratio:.0%}, all layers (stock)"] = (width(dense, calibration, args.ratio, list(range(n))), "")
    for method in ("cosine", "ppl"):
        model, drop = depth(dense, calibration, args.ratio, method)
        rows[f"depth -{len(drop)} layers ({method})"] = (model, f"removed {drop}")
    kv = dense.config.num_key_value_heads
    if kv > 1:
        rows[f"KV heads {kv} -> 1 (MQA)"] = (merge_kv_heads(copy.deepcopy(dense), 1), "")

    def speeds(model) -> dict[str, float]:
        short = generation_speed(model, short_prompt, [1], NEW, args.repeats, tok.pad_token_id)["1"]
        long = generation_speed(model, long_prompt, [1], NEW, args.repeats, tok.pad_token_id)["1"]
        return {
            "short": short["decode_tokens_per_s"],
            "long": long["decode_tokens_per_s"],
            "ttft_long_ms": long["ttft_ms"],
        }

    data, table_rows = [], []
    base_params, base_ppl = count_params(dense), None
    for name, (model, note) in rows.items():
        ppl = strided_perplexity(model, ids, CONTEXT, STRIDE, leading_bos(tok))["ppl"]
        base_ppl = base_ppl or ppl
        mine, ref = speeds(model), speeds(dense)  # the dense model beside every row
        up = {k: mine[k] / ref[k] for k in ("short", "long")}
        size = count_params(model)
        d = {"name": name, "note": note, "params": size, "removed": 1 - size / base_params,
             "ppl": ppl, "ppl_increase": ppl / base_ppl - 1, "kv_bytes_per_token": kv_bytes_per_token(model),
             "layers": model.config.num_hidden_layers, "stock": not hasattr(model.config, "layer_widths"),
             "tokens_per_s": mine, "dense_tokens_per_s": ref, "speedup": up}  # fmt: skip
        data.append(d)
        table_rows.append([name, f"{d['removed']:.1%}", f"{ppl:.2f}", f"{d['ppl_increase']:+.1%}",
                           d["kv_bytes_per_token"], mine["short"], f"{up['short']:.2f}x", mine["long"],
                           f"{up['long']:.2f}x", "yes" if d["stock"] else "no (distillprune type)"])  # fmt: skip
        print(table_rows[-1], flush=True)
    title = (f"{args.model} ({base_params:,} params), float32, no recovery: decode tok/s at batch 1 after 64 and "
             f"{args.context} prompt tokens (speed-up vs dense measured beside it)")  # fmt: skip
    header = ["model", "removed", "PPL", "PPL change", "KV B/token (16-bit)", "tok/s @64", "speed-up @64",
              f"tok/s @{args.context}", f"speed-up @{args.context}", "stock config"]  # fmt: skip
    name = "structure" if args.model == TEACHER else f"structure-{Path(args.model).name}"
    command = f"python benchmarks/structure.py --model {args.model} --ratio {args.ratio} --context {args.context}"
    write_result(name, command, [table(title, header, table_rows)], {"rows": data})


if __name__ == "__main__":
    main()
