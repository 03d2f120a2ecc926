"""Write BENCHMARKS.md from benchmarks/results/*.json: every benchmark's latest tables, with the command that
produced them, when, and the machine they ran on; and the README's summary of them (between its
``<!-- bench:begin -->`` and ``<!-- bench:end -->`` lines), one line per benchmark read from the same results.

    python benchmarks/collect.py
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT  # noqa: E402

from distillprune.hardware import LIBRARIES  # noqa: E402

ORDER = [
    "kd_throughput",
    "mfu",
    "prune_speed",
    "structure",
    "structure-gemma3-270m",
    "quality",
    "quantize",
    "qad",
    "calibration",
    "recovery",
    "teacher_store",
    "kd_loss_memory",
    "generation",
]
INTRO = """# Benchmarks

`make bench` runs kd_throughput, mfu, prune_speed, structure, quality, quantize, qad, calibration, recovery and
teacher_store (about three hours on a 2-core CPU) and rewrites this file from `benchmarks/results/*.json`
(`python benchmarks/collect.py`). Each section gives the command, the date and the machine of its latest run.
Targets and what the numbers mean are in each script's docstring.
"""


def main() -> None:
    parts = [INTRO]
    records = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}
    for name in sorted(records, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
        r = records[name]
        if "tables_markdown" not in r:
            continue  # an older result format: see README
        m = r["machine"]
        where = f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), {m['memory_gib']} GiB"
        where += f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
        parts += [
            f"## {name}",
            "",
            f"`{r['command']}` — {r['date']}; {where}; {_libraries(m)}.",
            "",
            r["tables_markdown"].replace("### ", "#### "),
            "",
        ]
    parts += _gpu_check(records.get("gpu_check"))
    out = ROOT / "BENCHMARKS.md"
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(parts))
    os.replace(tmp, out)
    print(f"written {out.relative_to(ROOT)} ({len(records)} results)")
    write_readme_summary(records, ROOT / "README.md")


BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def write_readme_summary(records: dict[str, dict], readme: Path) -> None:
    """Replace the lines between the README's bench markers with one line per benchmark that has a headline."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        return
    lines = []
    for name in ORDER:
        if name in records and name in HEADLINES:
            r = records[name]
            lines.append(f"- `{name}` ({r['date'][:10]}): {HEADLINES[name](r)}")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    tmp = readme.with_suffix(".tmp")
    tmp.write_text(head + BEGIN + "\n" + "\n".join(lines) + "\n" + END + tail)
    os.replace(tmp, readme)
    print(f"written the benchmark summary of {readme} ({len(lines)} lines)")


def _kd_throughput(r: dict) -> str:
    rows = r["rows"]
    fused, trl = rows["distillprune:fused_linear"], rows["trl"]
    line = (
        f"KD step {fused['tokens_per_s']:.0f} tokens/s (fused loss) vs {trl['tokens_per_s']:.0f} for TRL's "
        f"GKDTrainer, {fused['tokens_per_s'] / trl['tokens_per_s']:.2f}×, peak {fused['peak_mb']:,} vs "
        f"{trl['peak_mb']:,} MB"
    )
    if store := rows.get("distillprune:store"):
        line += (f"; from the offline teacher store (top-64) {store['tokens_per_s']:.0f} tokens/s, "
                 f"{store['tokens_per_s'] / trl['tokens_per_s']:.2f}× TRL")  # fmt: skip
    return line + f"; best **{r['speedup_vs_trl']:.2f}×** (target 1.3×)"


def _mfu(r: dict) -> str:
    return f"the KD step reaches {r['mfu']:.1%} of this machine's measured float32 matmul rate"


def _prune_speed(r: dict) -> str:
    at20 = next((row["speed"] for row in r["rows"] if abs(row["ratio"] - 0.2) < 1e-9), None)
    if at20 is None:  # run with --ratios that leave 20% out
        return f"no 20% row (ratios {', '.join(str(row['ratio']) for row in r['rows'])})"
    cells = []
    for batch in ("1", "16"):
        noisy = " (within the spread)" if at20[batch].get("noisy") else ""
        cells.append(f"{at20[batch]['speedup']:.2f}× at batch {batch}{noisy}")
    return f"20% of parameters pruned: generation {', '.join(cells)} (target 1.25×)"


def _structure(r: dict) -> str:
    dense, *rows = r["rows"]
    parts = [f"{row['name']} {row['speedup']['short']:.2f}× decode, PPL {row['ppl']:,.1f}" for row in rows]
    return f"dense PPL {dense['ppl']:.1f}; " + "; ".join(parts)


def _quality(r: dict) -> str:
    q = r["results"]
    ce, kd = q["student_ce"]["after"], q["student_kd"]["after"]
    return (
        f"KD vs CE-only at equal steps: PPL {kd:,.1f} vs {ce:,.1f} ({kd / ce - 1:+.1%}); importance at 20%: Taylor "
        f"{q['prune_taylor']['ppl']:,.1f}, L2 {q['prune_l2']['ppl']:,.1f}, random {q['prune_random']['ppl']:,.1f}; "
        f"recovery LoRA {q['recovery_lora']['ppl']:.1f} vs KD {q['recovery_kd']['ppl']:.1f}"
    )


_QUANT_SHOWN = ("fp32", "int8-channel", "int4-g64", "GGUF Q4_K_M")


def _quantize(r: dict) -> str:
    rows = r["rows"]
    parts = [f"{name} PPL {row['ppl']:.1f}" for name, row in rows.items() if name.split(" (")[0] in _QUANT_SHOWN]
    return "; ".join(parts) + f" (Q4_K_M target met: {'yes' if r.get('target_met') else 'no'})"


def _qad(r: dict) -> str:
    return (
        f"{r['scheme']} PPL after equal steps: {r['plain']['int4_ppl']:.1f} trained plainly vs "
        f"{r['aware']['int4_ppl']:.1f} quantization-aware (float teacher {r['teacher_ppl']:.1f})"
    )


def _calibration(r: dict) -> str:
    first, last = r["rows"][0], r["rows"][-1]
    return (
        f"Taylor ranking from {first['windows']} vs {last['windows']} calibration windows of {r['seq_len']} tokens "
        f"({r['source']}): {first['kept_channels_shared']:.0%} of the kept channels shared (Spearman "
        f"{first['spearman_channels']:.2f}); pruned PPL on python_docs {first['pruned_disjoint_ppl']:.1f} vs "
        f"{last['pruned_disjoint_ppl']:.1f}"
    )


def _recovery(r: dict) -> str:
    best: dict[str, tuple[float, str]] = {}
    for name, row in r["rows"].items():
        if "ratio" in row:
            kind = "KD" if row["recipe"] == "prune_distill" else "LoRA"
            best[kind] = min(best.get(kind, (float("inf"), "")), (row["ratio"]["disjoint"], name))
    goals = {"LoRA": 1.25, "KD": 1.15}
    parts = [
        f"best {kind} ({name}) **{ratio:.2f}×** the dense control on disjoint text (goal {goals[kind]}×: "
        f"{'met' if ratio <= goals[kind] else 'not met'})"
        for kind, (ratio, name) in sorted(best.items())
    ]
    return "; ".join(parts) or "no row with its control yet"


def _teacher_store(r: dict) -> str:
    rows = r["rows"]
    parts = [f"{name} {row['val_ppl']:.2f} ({row['val_ratio']:.3f}×)" for name, row in rows.items() if name != "online"]
    store = rows.get("k=64", {}).get("store") or {}
    size = (
        f"; the k=64 store {store['bytes_per_token']:.0f} bytes/token, built in {store['build_s']:.0f} s"
        if store
        else ""
    )
    return (
        f"logit_distill val PPL, online teacher {rows['online']['val_ppl']:.2f} vs from the store "
        + ", ".join(parts)
        + size
    )


HEADLINES = {"kd_throughput": _kd_throughput, "mfu": _mfu, "prune_speed": _prune_speed, "structure": _structure,
             "quality": _quality, "quantize": _quantize, "qad": _qad, "calibration": _calibration,
             "recovery": _recovery, "teacher_store": _teacher_store}  # fmt: skip


def _libraries(m: dict) -> str:
    """torch and, where the result recorded them, the other libraries' versions."""
    names = [n for n in LIBRARIES if n != "torch"]
    return ", ".join([f"torch {m['torch']}"] + [f"{n} {m[n]}" for n in names if m.get(n)])


def _gpu_check(r: dict | None) -> list[str]:
    """``make gpu-check`` (tests/test_gpu.py) writes gpu_check.json on a CUDA machine: its figures, or a note."""
    lines = ["## gpu_check", ""]
    if not r:
        return lines + ["`make gpu-check` has not run on a GPU yet: no session has been lent one since it exists.", ""]
    lines += [
        f"`make gpu-check` on {r['device']}, torch {r['torch']}.",
        "",
        "| check | wall s | figures |",
        "|---|---|---|",
    ]
    for name, values in r.items():
        if isinstance(values, dict):
            figures = {k: v for k, v in values.items() if k not in ("auto", "wall_s")}
            lines.append(f"| {name} | {values.get('wall_s', '-')} | {json.dumps(figures) if figures else '-'} |")
    return lines + [""]


if __name__ == "__main__":
    main()
