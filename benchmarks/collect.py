"""Write BENCHMARKS.md from benchmarks/results/*.json: every benchmark's latest tables, with the command that
produced them, when, and the machine they ran on.

    python benchmarks/collect.py
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT  # noqa: E402

ORDER = [
    "kd_throughput",
    "mfu",
    "prune_speed",
    "structure",
    "structure-gemma3-270m",
    "quality",
    "quantize",
    "qad",
    "kd_loss_memory",
    "generation",
]
INTRO = """# Benchmarks

`make bench` runs kd_throughput, mfu, prune_speed, structure, quality, quantize and qad (about 55 minutes on a
2-core CPU) and rewrites this file from `benchmarks/results/*.json` (`python benchmarks/collect.py`). Each
section gives the command, the date and the machine of its latest run. Targets and what the numbers mean are in
each script's docstring.
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


def _libraries(m: dict) -> str:
    """torch and, where the result recorded them, the other libraries' versions."""
    names = ("transformers", "lightning", "trl", "peft", "deepspeed", "compressed-tensors", "llama-cpp-python")
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
