"""Zero-shot multiple-choice tasks over the packaged texts, run by lm-eval-harness (``lm-eval``).

The tasks are written as ordinary lm-eval task YAML files (``dataset_path: json`` over local JSONL) into the run
folder, so ``lm_eval --include_path <run>/zero_shot/tasks`` reproduces them outside this package. Each reports
``acc`` (sum of the choice's token log-likelihoods) and ``acc_norm`` (divided by its length in characters) separately.

- ``shakespeare_cloze``: the first half of a speech from a held-out play; pick its real second half out of 4
  (the others are second halves of other speeches of the same held-out plays).
- ``kjv_cloze``: the same over KJV verses.
- ``shakespeare_or_bible``: a passage and the question whether it comes from Shakespeare or the Bible.

Every item comes from the documents that ``split_documents`` holds out (``val_fraction``, ``seed``): Shakespeare's
held-out plays and KJV's held-out chapters, the documents a recipe training on either corpus validates on (with
the same fraction and seed), and which the packaged prompt and ICL sets leave out.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distillprune.errors import UserError
from distillprune.models import eval_mode
from distillprune.passages import all_speeches, kjv_verses

Item = dict[str, Any]  # {"context": str, "choices": list[str], "label": int}


def _cloze(passages: list[str], n: int, rng: random.Random, choices: int = 4) -> list[Item]:
    halves = []
    for text in passages:
        words = text.split()
        cut = len(words) // 2
        if cut >= 4:
            halves.append((" ".join(words[:cut]), " ".join(words[cut:])))
    rng.shuffle(halves)
    items = []
    for i, (context, ending) in enumerate(halves[:n]):
        others = [e for j, (_, e) in enumerate(halves) if j != i]
        options = [ending, *rng.sample(others, choices - 1)]
        rng.shuffle(options)
        items.append({"context": context, "choices": options, "label": options.index(ending)})
    return items


def shakespeare_cloze(n: int, seed: int, val_fraction: float) -> list[Item]:
    return _cloze(all_speeches("held_out", val_fraction, seed), n, random.Random(seed))


def kjv_cloze(n: int, seed: int, val_fraction: float) -> list[Item]:
    verses = kjv_verses(80, 300, "held_out", val_fraction, seed)
    rng = random.Random(seed)
    return _cloze(rng.sample(verses, min(len(verses), 4 * n)), n, rng)


def shakespeare_or_bible(n: int, seed: int, val_fraction: float) -> list[Item]:
    rng = random.Random(seed)
    speeches = all_speeches("held_out", val_fraction, seed)
    verses = kjv_verses(120, 400, "held_out", val_fraction, seed)
    half = n // 2
    rows = [(s, 0) for s in rng.sample(speeches, min(half, len(speeches)))]
    rows += [(v, 1) for v in rng.sample(verses, n - len(rows))]
    rng.shuffle(rows)
    question = "Passage: {}\nQuestion: Is this passage from Shakespeare or from the Bible?\nAnswer:"
    return [{"context": question.format(t), "choices": ["Shakespeare", "the Bible"], "label": y} for t, y in rows]


TASKS: dict[str, Callable[[int, int, float], list[Item]]] = {
    "shakespeare_cloze": shakespeare_cloze,
    "kjv_cloze": kjv_cloze,
    "shakespeare_or_bible": shakespeare_or_bible,
}


def write_tasks(folder: Path, names: list[str], n: int, seed: int, val_fraction: float) -> dict[str, list[Item]]:
    """Write the data and lm-eval YAML of each named task under ``folder``; returns {lm-eval task name: items}."""
    if unknown := [t for t in names if t not in TASKS]:
        raise UserError(f"unknown zero-shot task(s) {unknown}; packaged tasks: {', '.join(TASKS)}")
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in names:
        data, items = folder / f"{name}.jsonl", TASKS[name](n, seed, val_fraction)
        data.write_text("".join(json.dumps(row) + "\n" for row in items))
        spec = {
            "task": f"distillprune_{name}",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
            "output_type": "multiple_choice",
            "test_split": "test",
            "doc_to_text": "{{context}}",
            "doc_to_target": "label",
            "doc_to_choice": "choices",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
            "metadata": {"version": 1.0},
        }
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        written[spec["task"]] = items
    return written


def run_zero_shot(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    folder: Path,
    names: list[str],
    n: int,
    seed: int,
    val_fraction: float = 0.05,
    batch_size: int = 16,
) -> dict[str, dict[str, float]]:
    """Score ``model`` on the named packaged tasks with lm-eval; ``{task: {acc, acc_stderr, acc_norm,
    acc_norm_stderr, n, chance}}``."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    for noisy in ("lm-eval", "lm_eval"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    task_names = write_tasks(folder, names, n, seed, val_fraction)
    device = next(model.parameters()).device
    with eval_mode(model):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
        quiet, os.environ["TQDM_DISABLE"] = os.environ.get("TQDM_DISABLE"), "1"  # one bar per request batch otherwise
        results = simple_evaluate(
            model=lm,
            tasks=list(task_names),
            task_manager=TaskManager(include_path=str(folder), include_defaults=False),
            log_samples=False,
            bootstrap_iters=0,  # the standard errors below are the binomial ones
            verbosity="ERROR",
        )["results"]
        if quiet is None:
            os.environ.pop("TQDM_DISABLE")
    out = {}
    for name, task in zip(names, task_names, strict=True):
        r, items = results[task], task_names[task]
        count = len(items)
        # chance: the expected accuracy of a uniform guess among each item's choices
        out[name] = {"n": count, "chance": round(sum(1 / len(i["choices"]) for i in items) / count, 4)}
        for metric in ("acc", "acc_norm"):
            p = float(r[f"{metric},none"])
            out[name][metric] = round(p, 4)
            out[name][f"{metric}_stderr"] = round(math.sqrt(p * (1 - p) / max(count - 1, 1)), 4)
    return out
