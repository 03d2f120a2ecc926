"""The offline teacher: top-k buckets against the dense divergences, the store's files, and logit_distill trained
from the store on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import run_train, tiny_overrides
from distillprune.data import ResumableSampler
from distillprune.errors import UserError
from distillprune.logit_store import LocalTeacher, LogitStore, TopK, build, rows_for_steps, top_k
from distillprune.losses import JSD, TVD, ForwardKL, ReverseKL, SkewKL
from distillprune.objective import Objective

N, H, V = 24, 16, 96
DIVERGENCES = {
    "forward": lambda: ForwardKL(),
    "forward_t2": lambda: ForwardKL(temperature=2.0),
    "reverse": lambda: ReverseKL(),
    "jsd": lambda: JSD(beta=0.5),
    "skew": lambda: SkewKL(alpha=0.1),
    "tvd": lambda: TVD(),
}


def _problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)  # [N, H]
    head = torch.randn(V, H, generator=g) * 0.5  # [V, H]
    teacher = torch.randn(N, V, generator=g) * 3  # [N, V]
    targets = torch.randint(0, V, (N,), generator=g)
    return hidden, head, teacher, targets


def _exact(teacher: torch.Tensor, temperature: float) -> TopK:
    """k = V in float32: every token in the top-k, nothing in the tail, no storage rounding."""
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    values, ids = log_p.sort(dim=-1, descending=True)
    return TopK(ids.int(), values, torch.full((teacher.shape[0],), float("-inf")))


def _run(impl: str, divergence, teacher, kd_weight: float = 0.5) -> tuple[list[float], list[torch.Tensor]]:
    hidden, head, _, targets = _problem()
    hidden.requires_grad_(True)
    head.requires_grad_(True)
    obj = Objective(divergence, "dense" if impl == "reference" else impl, chunk_size=7)
    if impl == "fused_linear":
        out = obj.fused_linear(hidden, head, teacher, None, targets, kd_weight)
    else:
        out = obj(hidden @ head.T, teacher, targets, kd_weight)
    out[0].backward()
    return [float(x.detach()) for x in out], [hidden.grad, head.grad]


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("impl", ["dense", "chunked", "fused_linear"])
def test_top_k_at_full_vocab_is_the_dense_loss(name: str, impl: str) -> None:
    divergence = DIVERGENCES[name]()
    teacher = _problem()[2]
    ref_values, ref_grads = _run("reference", divergence, teacher)  # the dense loss on the teacher's logits
    values, grads = _run(impl, divergence, _exact(teacher, divergence.temperature))
    assert values == pytest.approx(ref_values, rel=1e-5, abs=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_small_k_bounds_the_full_kl_from_below_and_the_gap_shrinks_with_k() -> None:
    hidden, head, teacher, _ = _problem(1)
    student = hidden @ head.T
    full = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="none")
    full = full.sum(-1)  # [N]: KL(p || q) per position
    gaps = []
    for k in (1, 4, 16, 64, V):
        log_q, log_p = top_k(teacher, k).buckets(student)
        bucketed = (log_p.exp() * (log_p - log_q)).sum(-1)
        assert (bucketed <= full + 1e-3).all()  # merging tokens into one bucket never raises a KL
        gaps.append(float((full - bucketed).mean() / full.mean()))
    assert gaps == sorted(gaps, reverse=True) and gaps[0] > 0.05 and gaps[-1] < 1e-3  # float16 values at k = V


def test_store_round_trip_reopen_and_refusals(tmp_path: Path) -> None:
    provenance = {"teacher": "a", "data": "x", "k": 4}
    store = LogitStore(tmp_path, provenance)
    teacher = _problem()[2]
    targets = [top_k(teacher[i : i + 3], 4) for i in (0, 3, 6)]
    store.write([5, 2, 9], targets)
    again = LogitStore(tmp_path, provenance)  # a later run opens what the first wrote
    assert len(again) == 3 and again.missing([1, 2, 5, 9]) == [1]
    got = again.get(2)
    assert torch.equal(got.ids, targets[1].ids) and torch.equal(got.logprobs, targets[1].logprobs)
    assert again.nbytes() > 0 and again.positions() == 9
    with pytest.raises(UserError, match="built for another data, teacher"):
        LogitStore(tmp_path, {**provenance, "teacher": "b", "data": "y"}, path=store.dir)
    with pytest.raises(UserError, match="not a teacher store"):
        LogitStore(tmp_path, provenance, path=tmp_path / "nowhere")
    with pytest.raises(UserError, match="holds no targets for training row 1"):
        again.get(1)


def test_a_cut_shard_is_set_aside_and_rebuilt_and_the_whole_ones_kept(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"input_ids": torch.randint(0, len(tok), (12,)).tolist()} for _ in range(10)]
    store = LogitStore(tmp_path, {"k": 8})
    source = LocalTeacher(teacher, 8, tok.pad_token_id)
    done = build(store, source, rows, list(range(10)), batch_size=3, shard_rows=4)
    assert done["rows_built"] == 10
    shards = sorted(store.dir.glob("shard-*.safetensors"))
    assert len(shards) == 3  # 4 + 4 + 2 rows (written when 4 or more are pending, and at the end)
    kept = LogitStore(tmp_path, {"k": 8}).get(0)
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])  # a copy cut short
    reopened = LogitStore(tmp_path, {"k": 8})
    lost = reopened.missing(range(10))
    assert len(lost) == 4 and (shards[1].parent / (shards[1].name + ".damaged")).is_file()
    assert build(reopened, source, rows, list(range(10)), batch_size=3)["rows_built"] == 4
    final = LogitStore(tmp_path, {"k": 8})
    assert final.missing(range(10)) == [] and torch.equal(final.get(0).ids, kept.ids)
    # what the store holds is the teacher's own top-k at each position
    logits = teacher(input_ids=torch.tensor([rows[lost[0]]["input_ids"]])).logits[0, :-1]  # [11, V]
    assert torch.equal(final.get(lost[0]).ids, top_k(logits, 8).ids)


@pytest.mark.parametrize("steps,world", [(3, 1), (2, 2), (100, 1), (-1, 1)])
def test_rows_for_steps_are_the_rows_the_sampler_yields(steps: int, world: int) -> None:
    n, batch, seed = 40, 4, 7
    wanted = set(rows_for_steps(n, seed, batch * world, steps, world))
    seen: set[int] = set()
    for rank in range(world):
        order = list(ResumableSampler(n, seed, rank, world))
        seen |= set(order[: steps * batch] if steps > 0 and steps * batch < len(order) else order)
    assert seen <= wanted and (steps < 0 or steps * batch * world >= n or seen == wanted)


# ------------------------------------------------------------------------------------------------ recipes


def _store_run(model: Path, text: Path, out: Path, store: Path, *extra: str, check: bool = True):
    args = ["recipe=logit_distill", *tiny_overrides(model, text, out), f"teacher_store.dir={store}", *extra]
    return run_train(*args, check=check)


def test_logit_distill_from_the_store(tmp_path: Path, tiny_model_dir: Path, tiny_text_file: Path) -> None:
    store = tmp_path / "store"
    online = tmp_path / "online"
    run_train("recipe=logit_distill", *tiny_overrides(tiny_model_dir, tiny_text_file, online))
    _store_run(tiny_model_dir, tiny_text_file, tmp_path / "full", store, "stages=[teacher_logits,train]",
                      "teacher_store.k=100000")  # fmt: skip  # k clipped to the vocabulary: the exact teacher
    m_online = json.loads((online / "metrics.json").read_text())
    m_full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    info = m_full["teacher_store"]
    assert info["rows_built"] == info["rows"] == 8 and info["k"] == 384  # 4 steps x batch 2
    assert info["bytes_per_token"] > 384 * 6  # float16 value + int32 id per kept token
    assert "teacher" not in m_full["resident_params"]  # training held no teacher
    assert m_full["student"]["val_loss"] == pytest.approx(m_online["student"]["val_loss"], rel=5e-4)  # float16
    # a small k: a second store beside the first; trained from it, then reused by a run that only trains
    _store_run(tiny_model_dir, tiny_text_file, tmp_path / "k8", store, "stages=[teacher_logits,train]",
               "teacher_store.k=8")  # fmt: skip
    reuse = tmp_path / "reuse"
    _store_run(tiny_model_dir, tiny_text_file, reuse, store, "stages=[train]", "teacher_store.k=8")
    m_reuse = json.loads((reuse / "metrics.json").read_text())
    assert m_reuse["teacher_store"]["rows_built"] == 0 and len(list(store.iterdir())) == 2
    assert 4.0 < m_reuse["teacher_store"]["bytes_per_token"] < 60.0  # 8 x 6 bytes + the tail's 4
    # more steps than the store holds, without the build stage: refused, naming the fix
    done = _store_run(tiny_model_dir, tiny_text_file, tmp_path / "more", store, "stages=[train]",
                      "teacher_store.k=8", "trainer.max_steps=6", check=False)  # fmt: skip
    assert done.returncode != 0 and "holds 8 of the 12 rows" in done.stderr and "add teacher_logits" in done.stderr
    # a store named by path is refused for other data (here: other block lengths), in one line
    named = Path(m_reuse["teacher_store"]["dir"])
    done = _store_run(tiny_model_dir, tiny_text_file, tmp_path / "other", store, "stages=[train]",
                      "teacher_store.k=8", f"teacher_store.path={named}", "data.seq_len=24", check=False)  # fmt: skip
    assert done.returncode != 0 and "was built for another data, data_rows than this run needs" in done.stderr


def test_store_settings_are_checked_before_loading(tmp_path: Path, tiny_model_dir: Path, tiny_text_file: Path) -> None:
    base = ["recipe=logit_distill", *tiny_overrides(tiny_model_dir, tiny_text_file, tmp_path / "x")]
    for extra, message in [
        (["stages=[teacher_logits,train]"], "teacher_store.k is null"),
        (["stages=[generate]"], "stages: unknown ['generate']; choose from teacher_logits, train"),
        (["teacher_store.k=0"], "teacher_store.k=0: must be"),
        (["teacher_store.k=8", "system.lmbda=0.5"], "system.lmbda > 0 samples from the student"),
    ]:
        done = run_train(*base, *extra, check=False)
        assert done.returncode != 0 and message in done.stderr, (extra, done.stderr[-500:])


def test_two_ranks_split_the_build_and_train_from_the_store(
    tmp_path: Path, tiny_model_dir: Path, tiny_text_file: Path
) -> None:
    out, store = tmp_path / "ddp", tmp_path / "store"
    _store_run(tiny_model_dir, tiny_text_file, out, store, "stages=[teacher_logits,train]", "teacher_store.k=8",
               "teacher_store.shard_rows=2", "trainer.strategy=ddp", "trainer.devices=2")  # fmt: skip
    info = json.loads((out / "metrics.json").read_text())["teacher_store"]
    assert info["rows"] == info["rows_built"] == 16  # 4 steps x batch 2 x 2 ranks
    writers = {p.name.split("-")[1] for p in Path(info["dir"]).glob("shard-*.safetensors")}
    assert writers == {"r0", "r1"}  # each rank built its share, in files of its own
    assert LogitStore(store, json.loads((Path(info["dir"]) / "provenance.json").read_text())).dir == Path(info["dir"])
