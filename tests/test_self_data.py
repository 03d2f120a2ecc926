"""Self-data recovery: the unpruned model's own documents as the data.source part ``self`` (stored and reused,
mixed by share with other sources), end to end through prune_distill on its own defaults, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import prune_overrides, run_train
from distillprune.data import TextDataModule
from distillprune.self_data import document_start, resolve, self_documents


def _settings(cache: Path, documents: int = 6, **extra: object) -> dict:
    return {"documents": documents, "max_new_tokens": 16, "temperature": 1.0, "top_p": 0.95, "batch_size": 4,
            "cache_dir": str(cache), **extra}  # fmt: skip


def test_the_document_start_is_bos_or_the_end_of_text_separator(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert document_start(tok) == tok.convert_tokens_to_ids("<|endoftext|>") == 0  # the tiny tokenizer adds no BOS
    tok.add_special_tokens({"unk_token": "<|im_start|>"})  # the separator is still looked up by name
    assert document_start(tok) == 0
    # a tokenizer that starts every encoding with BOS (Llama 3, Gemma): BOS
    from tokenizers import processors

    bos = tok.convert_tokens_to_ids("<|im_start|>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                                  special_tokens=[("<|im_start|>", bos)])  # fmt: skip
    assert tok("a")["input_ids"][0] == bos and document_start(tok) == bos


def test_self_documents_are_sampled_stored_and_reused(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    c = OmegaConf.create(_settings(tmp_path / "cache"))
    docs = self_documents(model, tok, "tiny", c, seed=1)
    assert 2 <= len(docs) <= 6 and all(d["text"] for d in docs)
    assert len({d["text"] for d in docs}) == len(docs)  # sampled: every document its own
    (store,) = (tmp_path / "cache").iterdir()
    provenance = json.loads((store / "provenance.json").read_text())
    assert provenance["start_id"] == 0 and provenance["generation"]["do_sample"] is True
    rows = [json.loads(line) for line in (store / "rows.jsonl").read_text().splitlines()]
    for row in rows:  # each row stops at the separator or at max_new_tokens, and is what the text decodes from
        ids = row["response_ids"]
        assert len(ids) <= 16 and all(t not in (0, tok.eos_token_id) for t in ids[:-1])
    stamp = (store / "rows.jsonl").stat().st_mtime_ns
    assert self_documents(model, tok, "tiny", c, seed=1) == docs  # read back, not written again
    assert (store / "rows.jsonl").stat().st_mtime_ns == stamp
    other = self_documents(model, tok, "tiny", c, seed=2)  # another seed: another store, other samples
    assert len(list((tmp_path / "cache").iterdir())) == 2 and other != docs


def test_a_mixture_with_self_keeps_its_shares(tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = OmegaConf.create({
        "seed": 3, "model": {"name": "tiny"}, "data": {"source": f"{tiny_text_file}:0.75+self:0.25"},
        "self_data": _settings(tmp_path / "cache", documents=40, max_new_tokens=48),
    })  # fmt: skip
    info = resolve(cfg, model, tok, tmp_path / "out")
    path = tmp_path / "out" / "data" / "self.jsonl"
    assert info["file"] == str(path) and path.is_file() and info["documents"] == len(path.read_text().splitlines())
    assert cfg.data.source == f"{tiny_text_file}:0.75+{path}:0.25"  # the part now names the written file
    dm = TextDataModule(tok, cfg.data.source, seq_len=16, batch_size=2, val_fraction=0.2, seed=3)
    dm.setup()
    shares = [part["share"] for part in dm.mixture.values()]
    assert shares == pytest.approx([0.75, 0.25], abs=0.05)
    untouched = OmegaConf.create({"data": {"source": str(tiny_text_file)}})
    assert resolve(untouched, model, tok, tmp_path / "none") == {} and not (tmp_path / "none").exists()


def test_prune_distill_recovers_on_self_data_end_to_end(
    tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    """The recipe's own defaults (allocation, precision, device, loss) with data.source=self."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    self_args = ["data.source=self", "self_data.documents=32", "self_data.max_new_tokens=40",
                 f"self_data.cache_dir={cache}", "control=true"]  # fmt: skip
    run_train("recipe=prune_distill", *prune_overrides(tiny_model_dir, tiny_text_file, out), *self_args)
    metrics = json.loads((out / "metrics.json").read_text())
    written = metrics["self_data"]
    assert 2 <= written["documents"] <= 32 and written["tokens"] > 0 and Path(written["file"]).is_file()
    assert set(metrics["val_ppl"]) == {"dense", "pruned", "recovered", "control"}
    assert abs(metrics["params"]["removed_fraction"] - 0.2) < 0.01
    assert list(metrics["evaluation"]["models"]) == ["dense", "pruned", "control", "recovered"]
    assert OmegaConf.load(out / "config.yaml").data.source == "self"  # saved as the user wrote it
    assert len(list(cache.iterdir())) == 1  # one store, which the dense control read too (no second one)
    final = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    with torch.no_grad():
        assert torch.isfinite(final(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize(
    ("recipe", "extra"),
    [("logit_distill", "data.source=self"), ("prune_distill", "prune.calibration.source=self")],
)
def test_self_outside_a_pruning_recipes_data_is_one_line(
    recipe: str, extra: str, tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    base = prune_overrides(tiny_model_dir, tiny_text_file, tmp_path / "x") if recipe == "prune_distill" else []
    done = run_train(f"recipe={recipe}", *base, extra, f"output_dir={tmp_path / 'y'}", check=False)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and "the unpruned model's own documents" in last, done.stderr[-1500:]
