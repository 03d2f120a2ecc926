"""Pruning recovery that generalises: SmolLM2-135M pruned by 20%, recovered, and scored on text it never saw.

    python benchmarks/recovery.py [--only NAME ...] [--list]

Every row is one real run of ``train.py`` (prune_lora or prune_distill at the recipe's settings, with the
overrides the row names; ``trainer.max_steps`` 100 unless it says otherwise). Two perplexities per model:
- in-domain: the recovery data's own held-out documents (``val_ppl``: the held-out plays for the Shakespeare
  rows; the held-out plays, chapters and prompt/response pairs of the general mixture for the general rows; held-out
  documents of the dense model's own for the ``self`` rows, which recover on its samples: ``self_data``);
- disjoint: the prose of the Python language reference (``python_docs``, 30% of its topics held out by the
  recipes' split, 4,096 tokens in windows of 256 moved by 128), a text that neither the recovery data nor the
  calibration data contains.
Each ratio divides by the dense control: the unpruned model given the same recovery (``control: true``: the
same recipe, data, steps and seed). A row that differs from an earlier one in pruning settings alone shares
its control. Zero-shot and speed are left out (their own benchmarks measure them). The rows are run in order,
one at a time; results of rows not re-run are kept (``--only``). Writes benchmarks/results/recovery.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, table, write_result  # noqa: E402

COMMON = [
    "evaluate.zero_shot.tasks=[]", "evaluate.speed.batch_sizes=[]", "evaluate.text.source=python_docs",
    "evaluate.text.val_fraction=0.3", "logger.wandb.mode=disabled", "trainer.enable_progress_bar=false",
]  # fmt: skip
ONE_SHOT = ["prune.allocation.method=uniform", "prune.rounds=1", "trainer.max_steps=100"]  # whatever the defaults
SHAKESPEARE = [*ONE_SHOT, "data.source=shakespeare", "prune.calibration.source=shakespeare",
               "prune.calibration.samples=8"]  # fmt: skip
GENERAL = [*ONE_SHOT, "data.source=general", "prune.calibration.source=general"]
CAL64 = [*GENERAL, "prune.calibration.samples=64"]
SENS = [*CAL64, "prune.allocation.method=sensitivity"]
HALF_SELF = "shakespeare:0.2+kjv:0.15+packaged_chat:0.15+self:0.5"  # the general mixture at half its shares + self
# name: (recipe, overrides, the row whose dense control it shares, or None: its own: other recovery data, loss,
# weights or steps)
ROWS: dict[str, tuple[str, list[str], str | None]] = {
    "LoRA, Shakespeare, 8 cal.": ("prune_lora", SHAKESPEARE, None),
    "LoRA, general, 8 cal.": ("prune_lora", [*GENERAL, "prune.calibration.samples=8"], None),
    "LoRA, general, 64 cal.": ("prune_lora", CAL64, "LoRA, general, 8 cal."),
    "LoRA, general, 64 cal., sensitivity": ("prune_lora", SENS, "LoRA, general, 8 cal."),
    "LoRA, general, 64 cal., 2 rounds": ("prune_lora", [*CAL64, "prune.rounds=2"], "LoRA, general, 8 cal."),
    "KD, general, 64 cal.": ("prune_distill", CAL64, None),
    "KD, general, 64 cal., sensitivity": ("prune_distill", SENS, "KD, general, 64 cal."),
    "KD, general, 64 cal., sensitivity, reverse KL": (
        "prune_distill",
        [*SENS, "loss._target_=distillprune.losses.ReverseKL"],
        None,
    ),  # fmt: skip
    "KD, general, 64 cal., sensitivity, 2 rounds": ("prune_distill", [*SENS, "prune.rounds=2"], "KD, general, 64 cal."),
    "KD, general, 64 cal., sensitivity, KD only": ("prune_distill", [*SENS, "system.kd_weight=1.0"], None),
    "KD, self, 64 cal., sensitivity": ("prune_distill", [*SENS, "data.source=self"], None),
    "LoRA, self, 64 cal., sensitivity": ("prune_lora", [*SENS, "data.source=self"], None),
    "KD, general + self, 64 cal., sensitivity": ("prune_distill", [*SENS, f"data.source={HALF_SELF}"], None),
    "KD, general, 64 cal., sensitivity, 300 steps": ("prune_distill", [*SENS, "trainer.max_steps=300"], None),
}


def run_row(name: str, recipe: str, overrides: list[str], control: bool) -> dict:
    out = ROOT / "runs" / "bench-recovery" / name.replace(", ", "-").replace(" ", "_").replace(".", "")
    args = [f"recipe={recipe}", f"output_dir={out}", *COMMON, *overrides, f"control={str(control).lower()}"]
    print(f"-- {name}: python train.py {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "train.py"), *args], check=True, cwd=ROOT)
    m = json.loads((out / "metrics.json").read_text())
    models = m["evaluation"]["models"]
    return {
        "recipe": recipe,
        "overrides": overrides,
        "steps": m.get("steps"),
        "recovery_s": m.get("recovery_s"),
        "run_s": round(time.perf_counter() - t0, 1),
        "removed_fraction": m["params"]["removed_fraction"],
        "val_ppl": m["val_ppl"],
        "disjoint_ppl": {k: v["perplexity"]["ppl"] for k, v in models.items()},
        "rounds": m.get("rounds"),
        "layer_shares": m.get("layer_shares"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=None, help="row names to (re-)run; the others are kept")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    if args.list:
        print("\n".join(ROWS))
        return
    path = RESULTS / "recovery.json"
    done = json.loads(path.read_text())["rows"] if path.is_file() else {}
    for name, (recipe, overrides, shared) in ROWS.items():
        if args.only is None or name in args.only:
            done[name] = run_row(name, recipe, overrides, control=shared is None)
            _write(done)  # after every row: a stopped run keeps what it measured


def _write(done: dict) -> None:
    rows = []
    for name in [n for n in ROWS if n in done]:
        r, shared = done[name], ROWS[name][2]
        base = done.get(shared or name, r)  # the row that holds this row's control
        if "control" not in base["val_ppl"]:
            continue
        val, dis = r["val_ppl"], r["disjoint_ppl"]
        control_val, control_dis = base["val_ppl"]["control"], base["disjoint_ppl"]["control"]
        r["ratio"] = {"in_domain": round(val["recovered"] / control_val, 3),
                      "disjoint": round(dis["recovered"] / control_dis, 3)}  # fmt: skip
        rows.append([name, r.get("steps") or 100, r["recovery_s"], f"{val['dense']:.1f}", f"{val['pruned']:.1f}",
                     f"{val['recovered']:.1f}", f"{control_val:.1f}", f"{r['ratio']['in_domain']:.2f}x",
                     f"{dis['dense']:.1f}", f"{dis['pruned']:.1f}", f"{dis['recovered']:.1f}", f"{control_dis:.1f}",
                     f"{r['ratio']['disjoint']:.2f}x"])  # fmt: skip
    title = ("Recovery after 20% structured pruning, SmolLM2-135M: PPL in-domain (the recovery data's held-out "
             "part) and on disjoint text (python_docs), x the dense control (goal on disjoint text: LoRA <= 1.25x, "
             "KD <= 1.15x)")  # fmt: skip
    header = ["recovery", "steps", "recovery s", "in: dense", "in: pruned", "in: recovered", "in: control",
              "in: x", "disjoint: dense", "disjoint: pruned", "disjoint: recovered", "disjoint: control",
              "disjoint: x"]  # fmt: skip
    command = "python benchmarks/recovery.py " + " ".join(sys.argv[1:])
    write_result("recovery", command.strip(), [table(title, header, rows)], {"rows": done})


if __name__ == "__main__":
    main()
