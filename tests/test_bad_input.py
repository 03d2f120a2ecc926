"""Bad input through the real command line: exit code 2, one line on stderr naming the key or file, no traceback,
within seconds (before any model is loaded), and nothing under output_dir touched. The table of inputs and
messages in docs/bad_inputs.md is written by this test (DISTILLPRUNE_UPDATE_DOCS=1) and checked against it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import ROOT, _train_tokenizer, icl_overrides, make_tiny_model, prune_overrides, seq_overrides
from conftest import tiny_overrides as _tiny

DOC = ROOT / "docs" / "bad_inputs.md"
# most fail in 0.2 s; those that import torch (a checkpoint or tokenizer to read) or lightning (the keys that a
# Trainer accepts) take 2-7 s on an idle 2-core CPU; the bound leaves room for a busy one (make test runs two
# workers, each of which may be training beside this test's two subprocesses)
SECONDS = 60


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_model_dir: Path, tiny_text_file: Path, corpus_text: str) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    other_tok = _train_tokenizer(corpus_text[:20_000], vocab_size=300)
    gpt2 = root / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)).save_pretrained(gpt2)
    broken = root / "broken"
    broken.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text()) | {"num_key_value_heads": 3}
    (broken / "config.json").write_text(json.dumps(config))
    (root / "corrupt.ckpt").write_bytes(b"PK\x03\x04 the first bytes of a checkpoint, then nothing")
    torch.save({"weights": torch.ones(2)}, root / "foreign.ckpt")
    (root / "empty_folder.ckpt").mkdir()
    (root / "no_config").mkdir()
    (root / "bad.json").write_text("{not json")
    return {
        "model": tiny_model_dir, "text": tiny_text_file, "root": root, "gpt2": gpt2, "broken": broken,
        "other_tok": make_tiny_model(root / "other_tok", other_tok),
    }  # fmt: skip


def _cases(a: dict[str, Path], out: Path) -> list[tuple[str, list[str], str]]:
    """(what, arguments, the start of the one stderr line); ``out`` is the run folder every case points at."""
    r, cache = a["root"], a["root"] / "gen"
    kd = ["recipe=logit_distill", *_tiny(a["model"], a["text"], out)]
    seq = ["recipe=seq_distill", *seq_overrides(a["model"], out, cache)]
    icl = ["recipe=icl_distill", *icl_overrides(a["model"], out, cache)]
    prune = ["recipe=prune_lora", *prune_overrides(a["model"], a["text"], out)]
    depth = ["recipe=prune_depth", f"model.name={a['model']}", f"data.source={a['text']}", f"output_dir={out}"]
    merge = ["recipe=merge_kv", f"model.name={a['model']}", f"data.source={a['text']}", f"output_dir={out}"]
    ev = ["recipe=evaluate", f"model.name={a['model']}", f"evaluate.text.source={a['text']}", f"output_dir={out}"]
    qz = ["recipe=quantize", f"model.name={a['model']}", f"evaluate.text.source={a['text']}", f"output_dir={out}"]
    return [
        ("zero sequence length", [*kd, "data.seq_len=0"], "data.seq_len=0: must be an integer >= 2"),
        ("zero batch size", [*kd, "data.batch_size=0"], "data.batch_size=0: must be an integer >= 1"),
        ("negative steps", [*kd, "trainer.max_steps=-5"], "trainer.max_steps=-5: must be an integer >= -1"),
        ("zero learning rate", [*kd, "system.lr=0"], "system.lr=0: must be a number in (0, inf]"),
        ("negative learning rate", [*kd, "system.lr=-1e-4"], "system.lr=-0.0001: must be a number in (0, inf]"),
        ("zero temperature", [*kd, "loss.temperature=0"], "loss.temperature=0: must be a number in (0, inf]"),
        ("KD weight above 1", [*kd, "system.kd_weight=1.5"], "system.kd_weight=1.5: must be a number in [0, 1]"),
        ("zero devices", [*kd, "trainer.devices=0"], "trainer.devices=0: must be an integer >= 1"),
        ("zero nodes", [*kd, "trainer.num_nodes=0"], "trainer.num_nodes=0: must be an integer >= 1"),
        ("accumulation 0", [*kd, "trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0: must be"),
        ("unknown precision", [*kd, "trainer.precision=bf16"], "trainer.precision 'bf16' is unknown; choose auto"),
        ("unknown strategy", [*kd, "trainer.strategy=zero3"], "trainer.strategy 'zero3' is unknown; choose auto"),
        ("missing DeepSpeed config", [*kd, f"trainer.strategy={r}/nope.json"], f"trainer.strategy={r}/nope.json: no such"),
        ("DeepSpeed config not JSON", [*kd, f"trainer.strategy={r}/bad.json"], f"trainer.strategy={r}/bad.json: not valid JSON"),
        ("unknown accelerator", [*kd, "trainer.accelerator=tpu"], "trainer.accelerator 'tpu' is unknown"),
        ("unknown loss impl", [*kd, "system.loss_impl=fast"], "system.loss_impl 'fast' is unknown; choose auto, dense"),
        ("unknown dtype", [*kd, "teacher.dtype=fp8"], "teacher.dtype 'fp8' is unknown; choose auto, float32"),
        ("missing data file", [*kd, f"data.source={r}/nope.txt"], f"data.source={r}/nope.txt: no such file or folder"),
        ("missing eval text", [*kd, f"evaluate.text.source={r}/nope.txt"], f"evaluate.text.source={r}/nope.txt: no such"),
        ("model folder without config", [*kd, f"teacher.name={r}/no_config"], f"teacher.name={r}/no_config: not a model folder"),
        ("not a model name", [*kd, "teacher.name=not a model"], "teacher.name=not a model: not a packaged alias"),
        ("layer index out of range", [*kd, "student.keep_layers=[0,9]"], "student.keep_layers [0, 9] must be distinct"),
        ("sequence longer than the model's positions", [*kd, "data.seq_len=4096"], "data.seq_len=4096 is longer than teacher.name's max_position_embeddings (1024)"),
        ("heads not divisible", [*kd, "student.init=config", "student.config_overrides={num_attention_heads: 3}"],
         "student.config_overrides: hidden_size 64 is not divisible by 3 heads"),
        ("tokenizers differ", [*kd, f"student.name={a['other_tok']}"], "teacher ("),
        ("missing resume file", [*kd, f"resume={r}/nope.ckpt"], f"resume={r}/nope.ckpt: no such checkpoint"),
        ("corrupt resume file", [*kd, f"resume={r}/corrupt.ckpt"], f"resume={r}/corrupt.ckpt: {r}/corrupt.ckpt is not a PyTorch checkpoint"),
        ("foreign resume file", [*kd, f"resume={r}/foreign.ckpt"], f"resume={r}/foreign.ckpt: {r}/foreign.ckpt is a PyTorch file but not"),
        ("empty checkpoint folder", [*kd, f"resume={r}/empty_folder.ckpt"], f"resume={r}/empty_folder.ckpt: folder"),
        ("corrupt last.ckpt, resume=auto", [*kd, "resume=auto"], "resume=auto: "),
        ("unknown key", [*kd, "trainer.max_stepz=3"], "unknown key 'trainer.max_stepz'; did you mean 'trainer.max_steps'"),
        ("wrong type", [*kd, "trainer.max_steps=abc"], "trainer.max_steps expects int, got 'abc' (str)"),
        ("unknown recipe", ["recipe=nope"], "unknown recipe 'nope'; available recipes:"),
        ("missing prompt file", [*seq, f"prompts.source={r}/nope.jsonl"], f"prompts.source={r}/nope.jsonl: no such"),
        ("top_p 0", [*seq, "generate.top_p=0"], "generate.top_p=0: must be a number in (0, 1]"),
        ("unknown stage", [*seq, "stages=[generate,distill]"], "stages: unknown ['distill']"),
        ("teacher store stage without k", [*kd, "stages=[teacher_logits,train]"],
         "stages has teacher_logits but teacher_store.k is null"),
        ("teacher store path that is none", [*kd, "teacher_store.k=8", f"teacher_store.path={r}"],
         f"teacher_store.path={r} is not a teacher store"),
        ("served teacher at another temperature", [*kd, "teacher_store.k=8", "teacher_store.server.url=http://127.0.0.1:9",
         "loss.temperature=2.0"], "a served teacher returns log-probs at temperature 1"),
        ("unknown served-teacher api", [*kd, "teacher_store.server.api=openai"],
         "teacher_store.server.api 'openai' is unknown; choose prompt_logprobs, llama_cpp_python"),
        ("zero demonstrations", [*icl, "task.k=0"], "task.k=0: must be an integer >= 1"),
        ("more demonstrations than the pool", [*icl, "task.k=20"], "task.k=20 demonstrations asked for"),
        ("pruning ratio 1", [*prune, "prune.ratio=1.0"], "prune.ratio=1.0: must be a number in [0, 1)"),
        ("family pruning does not know", [*prune, f"model.name={a['gpt2']}"], "model.name="),
        ("heads not divisible in the config", [*prune, f"model.name={a['broken']}"], "model.name: "),
        ("pruned layer out of range", [*prune, "prune.layers=0,9"], "prune.layers must be indices in [0, 3], got [0, 9]"),
        ("unknown importance", [*prune, "prune.importance=magic"], "prune.importance 'magic' is unknown"),
        ("more layers removed than exist", [*depth, "depth.remove=9"], "depth.remove=9: the model has 4 layers"),
        ("first or last layer when they are kept", [*depth, "depth.remove=3"], "depth.remove=3: the model has 4 "
         "layers, of which 2 may go (the first and last are kept"),
        ("unknown block importance", [*depth, "depth.importance=magic"], "depth.importance 'magic' is unknown"),
        ("KV heads that do not divide", [*merge, "merge.kv_heads=3"], "merge.kv_heads=3: 4 query heads over 2 KV"),
        ("family merging does not know", [*merge, f"model.name={a['gpt2']}"], "model.name="),
        ("LoRA rank 0", [*prune, "lora.r=0"], "lora.r=0: must be an integer >= 1"),
        ("stride above context", [*ev, "evaluate.text.stride=512"], "evaluate.text.stride=512 must be in 1..context"),
        ("batch size 0 in a list", [*ev, "evaluate.speed.batch_sizes=[0]"], "evaluate.speed.batch_sizes: every entry"),
        ("unknown zero-shot task", [*ev, "evaluate.zero_shot.tasks=[hellaswag]"], "unknown zero-shot task(s)"),
        ("quantization bits a method lacks", [*qz, "quantize.schemes=[{bits: 16}]"], "quantize bits=16 is not supported by round-to-nearest"),
        ("a key a scheme does not have", [*qz, "quantize.schemes=[{bit: 4}]"], "quantize scheme {'bit': 4}: unknown key(s) ['bit']"),
        ("group size that does not divide", [*qz, "quantize.schemes=[{bits: 4, granularity: group, group_size: 48}]"], "quantize group_size=48 does not divide the input width 64 of the hidden size"),
        ("groups that pruned widths may not fit", [*prune, "quantize.schemes=[{bits: 4, granularity: group, group_size: 32}]"], "quantize group_size=32: the MLP width (prune.round_to=1)"),
        ("GPTQ bits it does not serve", [*qz, "quantize.schemes=[{bits: 3, method: gptq}]"], "quantize bits=3 is not supported by GPTQ; choose one of (4, 8)"),
        ("quantization method that does not exist", [*qz, "quantize.schemes=[{bits: 4, method: hqq}]"], "quantize method='hqq'; choose one of rtn, gptq, awq"),
        ("GPTQ without calibration data", [*qz, "quantize.schemes=[{bits: 4, group_size: 32, method: gptq}]", "quantize.calibration.samples=0"], "quantize method gptq/awq calibrates on data"),
        ("GGUF type that does not exist", [*qz, "quantize.gguf.types=[Q3_X]"], "unknown GGUF type 'Q3_X'; types: F32, F16"),
        ("GGUF of an architecture it does not know", [*qz, f"model.name={a['gpt2']}"], "quantize.gguf.types: GGUF export knows the Llama family"),
    ]  # fmt: skip


def _run(args: list[str], out: Path) -> tuple[subprocess.CompletedProcess, float, dict[str, bytes]]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text("an earlier run's config\n")
    (out / "metrics.json").write_text('{"earlier": true}\n')
    (out / "checkpoints").mkdir(exist_ok=True)
    (out / "checkpoints" / "last.ckpt").write_bytes(b"torn")  # what resume=auto finds: corrupt, and kept
    before = {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tempfile.mkdtemp(), env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    elapsed = time.perf_counter() - start
    after = {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    return (
        done,
        elapsed,
        {k: v for k, v in after.items() if before.get(k) != v} | {k: b"<deleted>" for k in before if k not in after},
    )


def test_bad_inputs_fail_fast_in_one_line(assets: dict[str, Path], tmp_path: Path) -> None:
    outs = {}
    cases = []
    for i, (what, args, message) in enumerate(_cases(assets, tmp_path / "OUT")):
        out = tmp_path / f"run{i}"
        outs[what] = out
        cases.append((what, [a.replace(str(tmp_path / "OUT"), str(out)) for a in args], message))
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda c: _run(c[1], outs[c[0]]), cases))
    assert len(cases) >= 25
    problems, rows = [], []
    for (what, _, message), (done, elapsed, changed) in zip(cases, results, strict=True):
        lines = done.stderr.strip().splitlines()
        line = lines[-1] if lines else ""
        checks = {
            "exit code 2": done.returncode == 2,
            "one line": len(lines) == 1,
            "no traceback": "Traceback" not in done.stderr,
            f"starts with 'error: {message}'": line.startswith(f"error: {message}"),
            f"under {SECONDS} s": elapsed < SECONDS,
            "output_dir untouched": not changed,
        }
        failed = [k for k, ok in checks.items() if not ok]
        if failed:
            problems.append(f"{what}: {failed}; rc={done.returncode} {elapsed:.1f}s stderr={done.stderr[-600:]!r}")
        rows.append(
            (
                what,
                line.removeprefix("error: ")
                .replace(str(assets["root"]), "<tmp>")
                .replace(str(assets["model"]), "<tiny>"),
            )
        )
    assert not problems, "\n".join(problems)
    times = sorted(elapsed for _, elapsed, _ in results)
    # a load of the model takes longer than this even alone; make test shares the CPU between two workers
    assert times[len(times) // 2] < 10, f"median {times[len(times) // 2]:.1f} s: validation got slow"
    for i, (what, text) in enumerate(rows):
        rows[i] = (what, text.replace(str(tmp_path), "<tmp>"))
    _check_doc(rows)


def _check_doc(rows: list[tuple[str, str]]) -> None:
    lines = [
        "# Bad input and what it says",
        "",
        "Every row is a run of `python train.py recipe=... key=value` that `tests/test_bad_input.py` makes, with the",
        "one line it prints on stderr (after `error: `) and exit code 2, before any model is loaded and without",
        "touching the run folder. `<tmp>` stands for the test's scratch folder. Regenerate with",
        "`DISTILLPRUNE_UPDATE_DOCS=1 make test` (or that test alone).",
        "",
        "| bad input | message |",
        "|---|---|",
        *[f"| {what} | {text.replace('|', '¦')} |" for what, text in rows],
    ]
    text = "\n".join(lines) + "\n"
    if os.environ.get("DISTILLPRUNE_UPDATE_DOCS"):
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(text)
    assert DOC.is_file() and DOC.read_text() == text, (
        "docs/bad_inputs.md is stale: rerun with DISTILLPRUNE_UPDATE_DOCS=1"
    )
