"""Logit KD from the offline teacher store against the online teacher, at equal steps: PPL, build time and size.

    python benchmarks/teacher_store.py [--steps 200] [--only NAME ...]

Every row is one real run of ``train.py recipe=logit_distill`` (SmolLM2-135M -> its 6-layer student, Shakespeare,
forward KL, kd_weight 0.5, the recipe's steps and seed): ``online`` runs the teacher in every step (which is
what k = V gives: at k = V the store's loss is the dense loss, tests/test_logit_store.py); the ``k=..`` rows
first build the store of the rows those steps read (``stages=[teacher_logits,train]``, a fresh store folder per
row, so every build is timed) and train from it with no teacher in memory. Reported: the student's held-out
PPL (the recipe's validation split) and on the evaluation text, x the online row; the build's seconds and bytes
per stored token; training tokens/s (its ``fit`` time, validation included). Zero-shot and speed are left out.
Writes benchmarks/results/teacher_store.json; rows not re-run are kept (``--only``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, table, write_result  # noqa: E402

RUNS = ROOT / "runs" / "bench-teacher-store"
COMMON = ["recipe=logit_distill", "evaluate.zero_shot.tasks=[]", "evaluate.speed.batch_sizes=[]",
          "logger.wandb.mode=disabled", "trainer.enable_progress_bar=false"]  # fmt: skip
ROWS = {
    "online": [],
    "k=64": ["stages=[teacher_logits,train]", "teacher_store.k=64"],
    "k=8": ["stages=[teacher_logits,train]", "teacher_store.k=8"],
}
GOAL = 0.02  # PPL within 2% of online KD at k = 64


def run_row(name: str, overrides: list[str], steps: int) -> dict:
    out = RUNS / name.replace("=", "")
    store = RUNS / "stores" / name.replace("=", "")
    shutil.rmtree(store, ignore_errors=True)  # a fresh store: its build is part of the row
    args = [*COMMON, f"output_dir={out}", f"trainer.max_steps={steps}", f"teacher_store.dir={store}", *overrides]
    print(f"-- {name}: python train.py {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "train.py"), *args], check=True, cwd=ROOT)
    m = json.loads((out / "metrics.json").read_text())
    text = m["evaluation"]["models"]["student"]["perplexity"]["ppl"]
    return {"overrides": overrides, "steps": m["steps"], "run_s": round(time.perf_counter() - t0, 1),
            "val_ppl": m["student"]["val_ppl"], "text_ppl": text, "tokens_per_s": m["tokens_per_s"],
            "store": m.get("teacher_store")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--only", nargs="+", default=None, help="row names to (re-)run; the others are kept")
    args = parser.parse_args()
    path = RESULTS / "teacher_store.json"
    done = json.loads(path.read_text())["rows"] if path.is_file() else {}
    for name, overrides in ROWS.items():
        if args.only is None or name in args.only:
            done[name] = run_row(name, overrides, args.steps)
            _write(done, args)


def _write(done: dict, args: argparse.Namespace) -> None:
    base = done.get("online")
    rows = []
    for name in [n for n in ROWS if n in done]:
        r, s = done[name], done[name]["store"] or {}
        ratio = r["val_ppl"] / base["val_ppl"] if base else None
        r["val_ratio"] = round(ratio, 4) if ratio else None
        rows.append([name, r["steps"], f"{r['val_ppl']:.2f}", f"{ratio:.3f}x" if ratio else "-",
                     f"{r['text_ppl']:.2f}", r["tokens_per_s"], s.get("build_s", "-"), s.get("bytes_per_token", "-"),
                     round(s["bytes"] / 2**20, 1) if s else "-", r["run_s"]])  # fmt: skip
    k64 = done.get("k=64", {}).get("val_ratio")
    verdict = "-" if k64 is None else ("met" if abs(k64 - 1) <= GOAL else "MISSED")
    title = (f"logit_distill from the offline teacher store vs the online teacher, equal steps (goal: k=64 within "
             f"{GOAL:.0%} of online PPL: {verdict})")  # fmt: skip
    header = ["teacher", "steps", "val PPL", "x online", "eval-text PPL", "train tokens/s", "store build s",
              "bytes/token", "store MB", "run s"]  # fmt: skip
    command = "python benchmarks/teacher_store.py " + " ".join(sys.argv[1:])
    write_result("teacher_store", command.strip(), [table(title, header, rows)], {"rows": done, "k64_ratio": k64})


if __name__ == "__main__":
    main()
