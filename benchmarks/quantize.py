"""SmolLM2-135M as fp32 Hugging Face vs GGUF F16 / Q8_0 / 4-bit under llama.cpp: size, decode tokens/s, PPL.

    python benchmarks/quantize.py [--model smollm2-135m] [--tokens 4096] [--repeats 3]

Every figure is measured in this one run, on the same held-out Shakespeare tokens (windows of 256 moved by 128,
the evaluate recipe's perplexity) and the same 64-token prompt with 64 greedy new tokens at batch 1, with the
same number of threads for PyTorch and llama.cpp. The fp32 HF speed is measured before and after the GGUF rows
(their mean is the baseline), so that a drift of the machine does not read as a speed-up. The HF rows also
include the round-to-nearest INT8 / INT4 copies and GPTQ / AWQ ones (llm-compressor, calibrated on 64 windows of
256 tokens of the training plays; loaded back from their compressed-tensors folders); PyTorch dequantizes them,
so they are no faster. The packaged
teacher's weights were de-quantized from Q4_1 and already sit on a 4-bit grid: pass --model a trained student to
measure a model whose weights do not. Target: 4-bit >= 3x the fp32 HF decode speed at <= 5% PPL increase.
Needs llama-cpp-python (`make bench` installs it). Writes benchmarks/results/quantize.json (another --model:
quantize-<its run folder>.json).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TEACHER, table, write_result  # noqa: E402

from distillprune.data import calibration_ids  # noqa: E402
from distillprune.evaluation import llamacpp  # noqa: E402
from distillprune.evaluation.metrics import strided_perplexity  # noqa: E402
from distillprune.evaluation.speed import generation_speed  # noqa: E402
from distillprune.evaluation.suite import held_out_ids  # noqa: E402
from distillprune.models import load_model, load_tokenizer  # noqa: E402
from distillprune.quant.calibrated import calibrated_folder  # noqa: E402
from distillprune.quant.gguf import export_gguf  # noqa: E402
from distillprune.quant.model import load_compressed, quantize_model, stored_bytes  # noqa: E402
from distillprune.quant.settings import LLAMA_CPP_TYPES, Scheme  # noqa: E402

CONTEXT, STRIDE, PROMPT, NEW = 256, 128, 64, 64
TARGET_SPEEDUP, TARGET_PPL = 3.0, 0.05
SCHEMES = [
    Scheme(8, True, "channel"),
    Scheme(4, True, "channel"),
    Scheme(4, True, "group", 64),
    Scheme(4, True, "group", 32),
]
CALIBRATED = [
    Scheme(4, True, "channel", 0, "gptq"),
    Scheme(4, True, "group", 64, "gptq"),
    Scheme(4, True, "group", 64, "awq"),
]


def hf_speed(model, prompt: torch.Tensor, repeats: int) -> float:
    return generation_speed(model, prompt, [1], NEW, repeats)["1"]["decode_tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=TEACHER)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not llamacpp.available():
        sys.exit("benchmarks/quantize.py needs llama-cpp-python: make bench (or pip install llama-cpp-python)")
    torch.manual_seed(0)
    tok = load_tokenizer(args.model)
    model = load_model(args.model).eval()
    ev = OmegaConf.create({"text": {"source": "shakespeare", "val_fraction": 0.05, "max_tokens": args.tokens}})
    ids = held_out_ids(ev, tok, None, 1234)
    prompt = ids[:PROMPT].unsqueeze(0)  # [1, 64]
    fp32_ppl = strided_perplexity(model, ids, CONTEXT, STRIDE)["ppl"]
    fp32_before = hf_speed(model, prompt, args.repeats)
    rows, data = [], {}

    def add(name: str, runtime: str, size: int, ppl: float, speed: float, types: dict | None = None) -> None:
        data[name] = {
            "runtime": runtime,
            "bytes": size,
            "ppl": ppl,
            "decode_tokens_per_s": speed,
            "tensor_types": types,
        }

    add("fp32", "PyTorch", stored_bytes(model, {}), fp32_ppl, fp32_before)
    for scheme in SCHEMES:
        q = copy.deepcopy(model)
        grids = quantize_model(q, scheme)
        add(
            f"{scheme.name} (RTN)",
            "PyTorch",
            stored_bytes(q, grids),
            strided_perplexity(q, ids, CONTEXT, STRIDE)["ppl"],
            hf_speed(q, prompt, args.repeats),
        )
        del q
    calibration = calibration_ids(tok, "shakespeare", 64, 256, 1234)  # [64, 256], never the held-out plays
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in CALIBRATED:
            folder = calibrated_folder(model, tok, scheme, calibration, Path(tmp) / scheme.name)
            q = load_compressed(folder).eval()
            size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            ppl = strided_perplexity(q, ids, CONTEXT, STRIDE)["ppl"]
            add(f"{scheme.name.removesuffix('-' + scheme.method)} ({scheme.method.upper()})", "PyTorch", size, ppl,
                hf_speed(q, prompt, args.repeats))  # fmt: skip
            del q
    with tempfile.TemporaryDirectory() as tmp:
        for qtype in ("F16", "Q8_0", "Q4_0", *(["Q4_K_M"] if "Q4_K_M" in LLAMA_CPP_TYPES else [])):
            info = export_gguf(model, tok, Path(tmp) / f"{qtype}.gguf", qtype)
            runner = llamacpp.LlamaCpp(Path(info["file"]), CONTEXT)
            speed = runner.speed(prompt[0].tolist(), NEW, args.repeats)["decode_tokens_per_s"]
            add(
                f"GGUF {qtype} ({info['architecture']})",
                "llama.cpp",
                info["bytes"],
                runner.perplexity(ids, CONTEXT, STRIDE)["ppl"],
                speed,
                info["tensor_types"],
            )
            del runner
    fp32_after = hf_speed(model, prompt, args.repeats)
    baseline = (fp32_before + fp32_after) / 2
    data["fp32"]["decode_tokens_per_s"] = round(baseline, 1)
    for name, d in data.items():
        d["speedup"] = round(d["decode_tokens_per_s"] / baseline, 2)
        d["ppl_increase"] = round(d["ppl"] / fp32_ppl - 1, 4)
        types = ", ".join(f"{k} {v}" for k, v in (d["tensor_types"] or {}).items())
        rows.append(
            [
                name,
                d["runtime"],
                round(d["bytes"] / 2**20, 1),
                d["decode_tokens_per_s"],
                f"{d['speedup']:.2f}x",
                d["ppl"],
                f"{d['ppl_increase']:+.1%}",
                types,
            ]
        )
    four_bit = [n for n in data if n.startswith("GGUF Q4")]
    meets = [n for n in four_bit if data[n]["speedup"] >= TARGET_SPEEDUP and data[n]["ppl_increase"] <= TARGET_PPL]
    best = meets[0] if meets else min(four_bit, key=lambda n: data[n]["ppl_increase"])
    met = bool(meets)
    verdict = (
        f"{best}: {data[best]['speedup']:.2f}x fp32 HF decode, PPL {data[best]['ppl_increase']:+.1%} "
        f"(target >= {TARGET_SPEEDUP}x at <= {TARGET_PPL:.0%}: {'met' if met else 'MISSED'})"
    )
    title = (
        f"Quantized {Path(args.model).name}: {ids.numel():,} held-out tokens, batch-1 decode of {NEW} tokens after "
        f"{PROMPT}, {torch.get_num_threads()} threads; fp32 HF {fp32_before:.1f} / {fp32_after:.1f} tok/s "
        f"before / after; {verdict}"
    )
    header = ["format", "runtime", "MB", "decode tok/s", "vs fp32 HF", "PPL", "PPL vs fp32", "tensor types"]
    command = f"python benchmarks/quantize.py --model {args.model} --tokens {args.tokens} --repeats {args.repeats}"
    result = (
        "quantize" if args.model == TEACHER else f"quantize-{Path(args.model).parent.name or Path(args.model).name}"
    )
    write_result(result, command, [table(title, header, rows)], {"rows": data, "target_met": met})


if __name__ == "__main__":
    main()
