"""Evaluation: strided perplexity and FLOPs against hand-made references, generation speed, lm-eval zero-shot
against a direct log-likelihood scorer, the evaluate recipe end to end, and the report with its plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from conftest import TINY_EVAL, make_tiny_model, run_train
from distillprune.evaluation.metrics import flops_per_token, strided_perplexity
from distillprune.evaluation.report import plot_sweep, plot_training, plot_widths
from distillprune.evaluation.speed import generation_speed, weights_mb
from distillprune.evaluation.zeroshot import TASKS, run_zero_shot, write_tasks


@pytest.fixture()
def model(tiny_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.mark.parametrize(("context", "stride"), [(32, 8), (32, 32), (16, 5)])
def test_strided_perplexity_scores_each_token_once_with_its_window(model, context: int, stride: int) -> None:
    ids = torch.randint(0, model.config.vocab_size, (101,), generator=torch.Generator().manual_seed(0))
    got = strided_perplexity(model, ids, context, stride)
    # reference: token i (i >= 1) is predicted from the window that scores it, one forward per token
    nll = []
    with torch.no_grad():
        for i in range(1, ids.numel()):
            start = 0 if i < context else ((i - context) // stride + 1) * stride
            if start == i:  # stride == context: a window's first token has nothing before it
                continue
            logits = model(ids[start:i].unsqueeze(0)).logits[0, -1]  # [V]: the prediction of token i
            nll.append(-torch.log_softmax(logits.double(), -1)[ids[i]].item())
    assert got["tokens"] == len(nll) == ids.numel() - 1 - (100 // context if stride == context else 0)
    assert got["loss"] == pytest.approx(sum(nll) / len(nll), abs=1e-4)
    assert got["ppl"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-3)


def test_strided_perplexity_rejects_a_stride_longer_than_the_context(model) -> None:
    from distillprune.errors import UserError

    with pytest.raises(UserError, match="stride=40 must be in 1..context"):
        strided_perplexity(model, torch.arange(50), 32, 40)


def test_flops_per_token_by_hand(model) -> None:
    c = model.config
    hd = c.hidden_size // c.num_attention_heads
    per_layer = (
        c.hidden_size * c.num_attention_heads * hd * 2  # q, o
        + c.hidden_size * c.num_key_value_heads * hd * 2  # k, v
        + c.hidden_size * c.intermediate_size * 3  # gate, up, down
    )
    linear = c.num_hidden_layers * per_layer + c.hidden_size * c.vocab_size  # + the (tied) head
    attention = 4 * c.num_hidden_layers * c.num_attention_heads * hd * (128 + 1) / 2
    assert flops_per_token(model, 128) == int(2 * linear + attention)


def test_generation_speed_reports_every_batch_size(model) -> None:
    prompts = torch.randint(5, 300, (4, 8))
    speed = generation_speed(model, prompts, [1, 4], new_tokens=4, repeats=1, pad_token_id=0)
    assert set(speed) == {"1", "4"}
    c = model.config
    for batch, row in speed.items():
        assert row["tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0 and row["ttft_ms"] > 0
        # at least the KV cache of the last step: layers x (k, v) x batch x KV heads x (8 + 4 - 1) positions x 16
        cache = c.num_hidden_layers * 2 * int(batch) * c.num_key_value_heads * 11 * 16 * 4 / 2**20
        assert row["peak_mb"] >= weights_mb(model) + cache - 0.05  # peak_mb is rounded to 0.1


def _choice_logprob(model, tok, context: str, choice: str) -> float:
    ctx = tok(context, add_special_tokens=False).input_ids
    whole = tok(context + " " + choice, add_special_tokens=False).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)  # [T, V]
    return sum(logp[t - 1, whole[t]].item() for t in range(len(ctx), len(whole)))


def test_lm_eval_zero_shot_matches_a_direct_scorer(model, tiny_tokenizer, tmp_path: Path) -> None:
    names = list(TASKS)
    got = run_zero_shot(model, tiny_tokenizer, tmp_path / "tasks", names, n=12, seed=3, batch_size=4)
    assert set(got) == set(names)
    for name in names:
        spec = yaml.safe_load((tmp_path / "tasks" / f"{name}.yaml").read_text())  # plain lm-eval task files
        assert spec["output_type"] == "multiple_choice" and spec["task"] == f"distillprune_{name}"
        items = [json.loads(line) for line in (tmp_path / "tasks" / f"{name}.jsonl").read_text().splitlines()]
        acc = acc_norm = 0
        for item in items:
            lls = [_choice_logprob(model, tiny_tokenizer, item["context"], c) for c in item["choices"]]
            acc += max(range(len(lls)), key=lls.__getitem__) == item["label"]
            norm = [ll / len(c) for ll, c in zip(lls, item["choices"], strict=True)]
            acc_norm += max(range(len(norm)), key=norm.__getitem__) == item["label"]
        assert got[name]["n"] == len(items) == 12
        assert got[name]["acc"] == pytest.approx(acc / len(items), abs=1e-4), name
        assert got[name]["acc_norm"] == pytest.approx(acc_norm / len(items), abs=1e-4), name
        assert got[name]["acc_stderr"] == pytest.approx(math.sqrt(acc / 12 * (1 - acc / 12) / 11), abs=1e-4)
        assert got[name]["chance"] == {"shakespeare_or_bible": 0.5}.get(name, 0.25)  # two choices, or four


def test_packaged_tasks_are_well_formed_and_deterministic(tmp_path: Path) -> None:
    write_tasks(tmp_path / "a", list(TASKS), 40, 7, 0.05)
    write_tasks(tmp_path / "b", list(TASKS), 40, 7, 0.05)
    for name in TASKS:
        a = (tmp_path / "a" / f"{name}.jsonl").read_text()
        assert a == (tmp_path / "b" / f"{name}.jsonl").read_text()
        items = [json.loads(line) for line in a.splitlines()]
        assert len(items) == 40
        labels = [i["label"] for i in items]
        assert len(set(labels)) > 1  # the answer is not always in the same place
        for item in items:
            assert len(set(item["choices"])) == len(item["choices"]) and 0 <= item["label"] < len(item["choices"])


def test_zero_shot_items_come_from_held_out_documents_that_no_packaged_set_trains_on() -> None:
    from distillprune.incontext import load_task
    from distillprune.passages import all_speeches, kjv_verses
    from distillprune.prompts import packaged_prompts

    train = set(all_speeches("train", 0.05, 1234)) | set(kjv_verses(80, 400, "train", 0.05, 1234))
    held_out = set(all_speeches("held_out", 0.05, 1234)) | set(kjv_verses(80, 400, "held_out", 0.05, 1234))
    assert held_out and train and not train & held_out
    for name in TASKS:  # every context (or its first half) is a held-out passage
        for item in TASKS[name](40, 1234, 0.05):
            text = item["context"].removeprefix("Passage: ").split("\nQuestion:")[0]
            assert any(p.startswith(text) for p in held_out), (name, text[:60])
    prompts = packaged_prompts(288, 1234)
    assert not any(p in row["prompt"] for row in prompts for p in held_out)
    for name in ("shakespeare_or_bible", "last_word", "verse_book"):  # the ICL tasks' passages: the training side
        inputs = {row["input"] for row in load_task(name, 600, 1234).rows}
        assert not any(p in text or text in p for text in inputs for p in held_out), name


def test_evaluate_recipe_side_by_side(tiny_model_dir: Path, tiny_tokenizer, tiny_text_file: Path, tmp_path: Path):
    other = make_tiny_model(tmp_path / "other", tiny_tokenizer, seed=1, num_hidden_layers=2)
    out = tmp_path / "eval"
    run_train(
        "recipe=evaluate", f"model.name={other}", f"baseline={tiny_model_dir}",
        f"evaluate.text.source={tiny_text_file}",
        "evaluate.text.val_fraction=0.2", *TINY_EVAL, "evaluate.zero_shot.tasks=[kjv_cloze,shakespeare_or_bible]",
        "evaluate.zero_shot.n=6", "evaluate.zero_shot.batch_size=4", "logger.wandb.mode=offline", f"output_dir={out}",
    )  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())["evaluation"]
    models = metrics["models"]
    assert list(models) == [f"baseline: {tiny_model_dir}", f"model: {other}"]
    small, big = models[f"model: {other}"], models[f"baseline: {tiny_model_dir}"]
    assert small["params"] < big["params"] and small["flops_per_token"] < big["flops_per_token"]
    for row in models.values():
        assert row["perplexity"]["tokens"] == 255 and row["perplexity"]["ppl"] > 1
        assert set(row["speed"]) == {"1", "4"} and set(row["zero_shot"]) == {"kjv_cloze", "shakespeare_or_bible"}
    assert metrics["settings"]["context"] == 32 and metrics["settings"]["stride"] == 16
    report = (out / "report.md").read_text()
    assert "windows of 32 tokens moved by 16" in report
    assert "| model | params | FLOPs/token | PPL |" in report and f"| model: {other} |" in report
    assert "kjv_cloze acc (chance 0.25) | kjv_cloze acc_norm (chance 0.25)" in report
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))  # the table went to the W&B run


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("evaluate.zero_shot.tasks=[hellaswag]", "unknown zero-shot task(s) ['hellaswag']; packaged tasks:"),
        ("evaluate.text.stride=64", "evaluate.text.stride=64 must be in 1..context (32)"),
        ("model.name=", "model.name is empty; give a packaged alias"),
    ],
)
def test_evaluate_bad_input_is_one_line(tiny_model_dir: Path, tiny_text_file: Path, tmp_path, extra, message):
    done = run_train(
        "recipe=evaluate", f"model.name={tiny_model_dir}", f"evaluate.text.source={tiny_text_file}",
        "evaluate.text.val_fraction=0.2", *TINY_EVAL, "logger.wandb.mode=disabled", f"output_dir={tmp_path}", extra,
        check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {message}"), done.stderr[-1500:]


def _png_shape(path: Path) -> tuple[int, ...]:
    return matplotlib.image.imread(path).shape


def test_plots_are_real_images(tmp_path: Path) -> None:
    log = tmp_path / "metrics.csv"
    log.write_text(
        "epoch,step,train/ce,train/kd,train/loss,val/ppl\n0,1,5.0,2.0,3.5,\n0,2,4.0,1.5,2.75,\n0,2,,,,90.0\n"
        "0,3,3.5,1.0,2.25,\n0,4,,,,40.0\n"
    )
    plots = plot_training(log, tmp_path / "report")
    assert set(plots) == {"training_curves", "val_ppl"}
    dense = [{"heads": 4, "kv_heads": 2, "intermediate": 128}] * 4
    pruned = [
        dense[0],
        {"heads": 2, "kv_heads": 2, "intermediate": 96},
        {"heads": 2, "kv_heads": 2, "intermediate": 96},
        dense[0],
    ]
    plots["layer_widths"] = plot_widths(dense, pruned, tmp_path / "report")
    rows = [{"removed_fraction": r, "ppl": 10 * (1 + 5 * r), "tokens_per_s": 20 / (1 - r)} for r in (0, 0.1, 0.3)]
    plots["pruning_sweep"] = plot_sweep(rows, tmp_path / "report")
    for path in plots.values():
        height, width, channels = _png_shape(path)
        assert height > 200 and width > 400 and channels in (3, 4)
