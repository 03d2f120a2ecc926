"""How the importance ranking settles as calibration data grows, on SmolLM2-135M.

    python benchmarks/calibration.py [--source general] [--sizes 8 16 32 64 128] [--seq-len 128]

Taylor importance (the prune_lora default) from the first n windows of one seeded draw of --seq-len-token windows
from --source (the training side of the general mixture: Shakespeare, KJV and the packaged prompt/response
pairs), for each n of --sizes, over prune_lora's layers 3..26. Against the largest n: the Spearman correlation
of the MLP channel scores and of the query-head scores (mean over layers), and the share of the channels and
heads that a 20% uniform plan keeps which the largest n keeps too. Then each ranking's pruned model (20%, no
recovery) is scored on text that no calibration set holds (python_docs, the evaluation text of the recovery
benchmark). Writes benchmarks/results/calibration.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TEACHER, table, write_result  # noqa: E402

from distillprune.data import calibration_ids  # noqa: E402
from distillprune.evaluation.metrics import strided_perplexity  # noqa: E402
from distillprune.models import load_model, load_tokenizer  # noqa: E402
from distillprune.prune import apply, layer_widths, plan, score, select  # noqa: E402
from distillprune.sources import load_documents, split_documents  # noqa: E402

LAYERS = list(range(3, 27))  # prune_lora's prune.layers "3:27"


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = (t.argsort().argsort().float() for t in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def shared(keep: dict, ref: dict, part: str) -> float:
    """The share of ``ref``'s kept structures (``heads`` or ``channels``, over all layers) that ``keep`` keeps too."""
    return sum(len(set(keep[i][part]) & set(ref[i][part])) for i in LAYERS) / sum(len(ref[i][part]) for i in LAYERS)


def disjoint_ids(tok, n: int = 4096) -> torch.Tensor:
    _, held = split_documents(load_documents("python_docs"), 0.3, 1234)  # the recovery benchmark's evaluation text
    return tok("\n\n".join(t for _, t in held), add_special_tokens=False, return_tensors="pt").input_ids[0][:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="general")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--ratio", type=float, default=0.2)
    args = parser.parse_args()
    tok = load_tokenizer(TEACHER)
    dense = load_model(TEACHER).eval()
    windows = calibration_ids(tok, args.source, max(args.sizes), args.seq_len, 1234)  # [N, T]
    ids = disjoint_ids(tok)
    the_plan = plan(dense, args.ratio, LAYERS, "q_per_group")
    scores, keeps, seconds = {}, {}, {}
    for n in sorted(args.sizes):
        t0 = time.perf_counter()
        scores[n], _ = score(dense, [{"input_ids": windows[i : i + 1]} for i in range(n)], "taylor", LAYERS)
        seconds[n] = time.perf_counter() - t0
        keeps[n] = select(scores[n], the_plan, layer_widths(dense), "q_per_group", uniform=True)
    top = max(args.sizes)
    rows, data = [], []
    dense_ppl = strided_perplexity(dense, ids, 256, 128)["ppl"]
    for n in sorted(args.sizes):
        s, ref = scores[n], scores[top]
        rho_ch = sum(spearman(s[i].channels, ref[i].channels) for i in LAYERS) / len(LAYERS)
        rho_h = sum(spearman(s[i].heads, ref[i].heads) for i in LAYERS) / len(LAYERS)
        same = lambda part, n=n: shared(keeps[n], keeps[top], part)  # noqa: E731
        pruned = apply(copy.deepcopy(dense), keeps[n])
        ppl = strided_perplexity(pruned, ids, 256, 128)["ppl"]
        del pruned
        row = {"windows": n, "tokens": n * args.seq_len, "spearman_channels": round(rho_ch, 4),
               "spearman_heads": round(rho_h, 4), "kept_channels_shared": round(same("channels"), 4),
               "kept_heads_shared": round(same("heads"), 4), "pruned_disjoint_ppl": round(ppl, 2),
               "score_s": round(seconds[n], 1)}  # fmt: skip
        data.append(row)
        rows.append([n, n * args.seq_len, f"{rho_ch:.3f}", f"{rho_h:.3f}", f"{same('channels'):.1%}",
                     f"{same('heads'):.1%}", f"{ppl:.1f}", f"{seconds[n]:.0f}"])  # fmt: skip
    title = (f"Taylor ranking vs calibration windows ({args.source}, {args.seq_len} tokens each; against {top} "
             f"windows), SmolLM2-135M pruned {args.ratio:.0%} without recovery; dense PPL on python_docs "
             f"{dense_ppl:.1f}")  # fmt: skip
    header = ["windows", "tokens", "Spearman channels", "Spearman heads", "kept channels shared",
              "kept heads shared", "pruned PPL (python_docs)", "scoring s"]  # fmt: skip
    command = "python benchmarks/calibration.py " + " ".join(sys.argv[1:])
    write_result("calibration", command.strip(), [table(title, header, rows)],
                 {"source": args.source, "seq_len": args.seq_len, "ratio": args.ratio, "dense_ppl": dense_ppl,
                  "rows": data})  # fmt: skip


if __name__ == "__main__":
    main()
