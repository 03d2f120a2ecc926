"""Quality on SmolLM2-135M: KD vs CE-only student; Taylor vs L2 vs random importance at 20%; LoRA vs KD recovery.

    python benchmarks/quality.py [--kd-steps 20] [--recovery-steps 10] [--batch 4]

Every perplexity is over the same held-out text: the Shakespeare plays that the recipes hold out (val_fraction
0.05, seed 1234), 2,048 tokens in 256-token windows moved by 128. Training data are blocks of the other plays.
- KD vs CE: the logit_distill student (teacher layers [0, 6, 12, 18, 24, 29]) trained for the same steps, data
  and learning rate with 0.5·CE + 0.5·KL(T=1) and with CE alone.
- Importance: the prune_lora recipe's pruning at 20% of parameters (layers 3-26, uniform, GQA-aware, 8
  calibration blocks of 128 tokens) with each importance, no recovery.
- Recovery from the Taylor-pruned model, the same steps and data: LoRA r=8 on all projections (lr 2e-4, merged)
  vs full fine-tuning with 0.5·CE + 0.5·KL from the dense model (lr 1e-4).
These are short runs sized for a 2-core CPU; they compare methods, they are not converged numbers. Writes
benchmarks/results/quality.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import KEEP_LAYERS, TEACHER, fit, kd_blocks, table, write_result  # noqa: E402
from prune_speed import LAYERS, pruned_copy  # noqa: E402

from distillprune.data import load_documents, split_documents  # noqa: E402
from distillprune.distill import DistillSystem  # noqa: E402
from distillprune.evaluation.metrics import count_params, strided_perplexity  # noqa: E402
from distillprune.losses import ForwardKL  # noqa: E402
from distillprune.models import load_model, load_student, load_tokenizer  # noqa: E402
from distillprune.prune.importance import score  # noqa: E402


def held_out(tok) -> torch.Tensor:
    _, val = split_documents(load_documents("shakespeare"), 0.05, 1234)
    return tok("\n\n".join(t for _, t in val)[:30_000], return_tensors="pt").input_ids[0][:2048]  # [2048]


def ppl(model, ids: torch.Tensor) -> float:
    return strided_perplexity(model, ids, 256, 128)["ppl"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kd-steps", type=int, default=20)
    parser.add_argument("--recovery-steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    tok = load_tokenizer(TEACHER)
    teacher = load_model(TEACHER).eval()
    ids = held_out(tok)
    blocks = kd_blocks(tok, 256, args.batch * max(args.kd_steps, args.recovery_steps))
    results: dict = {"teacher_ppl": ppl(teacher, ids)}

    kd_rows = []
    for name, kd_weight in (("CE only", 0.0), ("0.5 CE + 0.5 KL(T=1)", 0.5)):
        torch.manual_seed(0)
        student = load_student(TEACHER, init="layer_drop", keep_layers=KEEP_LAYERS)
        before = ppl(student, ids)
        system = DistillSystem(student, teacher if kd_weight else None, ForwardKL() if kd_weight else None,
                               kd_weight=kd_weight, lr=3e-4, warmup_steps=2)  # fmt: skip
        times = fit(system, blocks[: args.batch * args.kd_steps], args.batch)
        after = ppl(student, ids)
        kd_rows.append([name, args.kd_steps, f"{before:,.0f}", f"{after:.1f}", f"{sum(times) / len(times):.1f}"])
        results[f"student_{'kd' if kd_weight else 'ce'}"] = {"before": before, "after": after}

    calibration = [{"input_ids": b.unsqueeze(0)} for b in kd_blocks(tok, 128, 8)]
    imp_rows, pruned = [], {}
    for importance in ("taylor", "l2", "random"):
        scoring = copy.deepcopy(teacher).requires_grad_(True)  # the teacher was frozen by the KD run
        scores, _ = score(scoring, calibration, importance, LAYERS, "sum", 1234)
        model = pruned[importance] = pruned_copy(scoring, scores, 0.2)
        del scoring
        removed = 1 - count_params(model) / count_params(teacher)
        imp_rows.append([importance, f"{removed:.1%}", f"{ppl(model, ids):.1f}"])
        results[f"prune_{importance}"] = {"removed_fraction": removed, "ppl": float(imp_rows[-1][2])}

    rec_rows = []
    rec_blocks = blocks[: args.batch * args.recovery_steps]
    for name in ("LoRA r=8", "KD from dense"):
        model = copy.deepcopy(pruned["taylor"]).requires_grad_(True)
        if name.startswith("LoRA"):
            from peft import LoraConfig, get_peft_model

            targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                          target_modules=targets, task_type="CAUSAL_LM"))  # fmt: skip
            times = fit(DistillSystem(peft_model, kd_weight=0.0, lr=2e-4, warmup_steps=2), rec_blocks, args.batch)
            model = peft_model.merge_and_unload()
        else:
            system = DistillSystem(model, teacher, ForwardKL(), kd_weight=0.5, lr=1e-4, warmup_steps=2)
            times = fit(system, rec_blocks, args.batch)
        after = ppl(model.eval(), ids)
        rec_rows.append([name, args.recovery_steps, results["prune_taylor"]["ppl"], f"{after:.1f}",
                         f"{sum(times) / len(times):.1f}"])  # fmt: skip
        results[f"recovery_{'lora' if name.startswith('LoRA') else 'kd'}"] = {"ppl": after}

    t = results["teacher_ppl"]
    tables = [
        table(f"KD vs CE-only student, equal steps (batch {args.batch} x 256; teacher PPL {t:.1f})",
              ["objective", "steps", "PPL before", "PPL after", "s/step"], kd_rows),
        table(f"Importance at 20% of parameters removed, no recovery (dense PPL {t:.1f})",
              ["importance", "removed", "PPL"], imp_rows),
        table("Recovery of the Taylor-pruned model, equal steps", ["recovery", "steps", "PPL pruned", "PPL after",
              "s/step"], rec_rows),
    ]  # fmt: skip
    command = (
        f"python benchmarks/quality.py --kd-steps {args.kd_steps} --recovery-steps {args.recovery_steps} "
        f"--batch {args.batch}"
    )
    write_result("quality", command, tables, {"results": results})


if __name__ == "__main__":
    main()
