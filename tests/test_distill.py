"""The distillation system: loss mixing, aligned teacher views, on-policy batches and the LR schedule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from distillprune.data import collate, encode_chat
from distillprune.distill import DistillSystem, on_policy_coin
from distillprune.incontext import encode_views
from distillprune.losses import IGNORE_INDEX, ForwardKL
from distillprune.models import load_model, load_tokenizer
from distillprune.objective import shifted


@pytest.fixture()
def pair(tiny_model_dir: Path, tiny_tokenizer):
    torch.manual_seed(0)
    teacher = load_model(str(tiny_model_dir))
    student = load_model(str(tiny_model_dir))
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return student, teacher, load_tokenizer(str(tiny_model_dir))


def test_loss_is_the_weighted_mix(pair) -> None:
    student, teacher, tok = pair
    batch = collate([{"input_ids": tok("To be or not to be, that is").input_ids}], tok.pad_token_id)
    system = DistillSystem(student, teacher, ForwardKL(temperature=2.0), kd_weight=0.3)
    loss, parts = system._shared_step(batch)
    s, labels = shifted(student(batch["input_ids"]).logits, batch["labels"])
    t, _ = shifted(teacher(batch["input_ids"]).logits, batch["labels"])
    ce = torch.nn.functional.cross_entropy(s.reshape(-1, s.shape[-1]), labels.reshape(-1))
    kd = ForwardKL(temperature=2.0)(s, t, labels)
    assert parts["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert parts["kd"].item() == pytest.approx(kd.item(), rel=1e-5)
    assert loss.item() == pytest.approx(0.7 * ce.item() + 0.3 * kd.item(), rel=1e-5)


def test_teacher_view_is_compared_on_the_answer_tokens(pair) -> None:
    student, teacher, tok = pair
    row = {
        "teacher": [{"role": "user", "content": "Hark"}, {"role": "assistant", "content": "Bible"},
                    {"role": "user", "content": "Thou art"}],
        "student": [{"role": "user", "content": "Thou art"}],
        "answer": "Shakespeare",
    }  # fmt: skip
    batch = collate([encode_views(row, tok, 256)], tok.pad_token_id)
    _, parts = DistillSystem(student, teacher, ForwardKL(), kd_weight=1.0)._shared_step(batch)
    s, s_lab = shifted(student(batch["input_ids"]).logits, batch["labels"])
    t, t_lab = shifted(teacher(batch["teacher_input_ids"]).logits, batch["teacher_labels"])
    expected = ForwardKL()(s[s_lab != IGNORE_INDEX], t[t_lab != IGNORE_INDEX])
    assert parts["kd"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert s_lab[s_lab != IGNORE_INDEX].tolist() == t_lab[t_lab != IGNORE_INDEX].tolist()


def test_on_policy_batches_are_student_samples_scored_by_kd_alone(pair) -> None:
    student, teacher, tok = pair
    rows = [encode_chat([{"role": "user", "content": p}, {"role": "assistant", "content": "an answer"}], tok, 128)
            for p in ("Thou art", "What light")]  # fmt: skip
    batch = collate(rows, tok.pad_token_id)
    system = DistillSystem(student, teacher, ForwardKL(), kd_weight=0.5, lmbda=1.0, max_new_tokens=5)
    samples = system._student_samples(batch)
    for i, row in enumerate(rows):
        prompt = row["input_ids"][: row["prompt_len"]]
        ids, labels = samples["input_ids"][i].tolist(), samples["labels"][i].tolist()
        assert ids[: len(prompt)] == prompt and all(t == IGNORE_INDEX for t in labels[: len(prompt)])
        response = [t for t in labels if t != IGNORE_INDEX]
        assert 0 < len(response) <= 5 and ids[len(prompt) : len(prompt) + len(response)] == response
    loss, parts = system._shared_step(batch)
    assert parts["on_policy"].item() == 1.0 and loss.item() == pytest.approx(parts["kd"].item())
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())

    off = DistillSystem(student, teacher, ForwardKL(), kd_weight=0.5, lmbda=0.0)
    assert "on_policy" not in off._shared_step(batch)[1]


def test_on_policy_coin_is_the_same_for_a_step_and_near_lmbda() -> None:
    draws = [on_policy_coin(1234, step, 0.3) for step in range(2000)]
    assert draws == [on_policy_coin(1234, step, 0.3) for step in range(2000)]  # what any other rank draws
    assert abs(sum(draws) / len(draws) - 0.3) < 0.04
    assert not any(on_policy_coin(1234, step, 0.0) for step in range(100))
    assert all(on_policy_coin(1234, step, 1.0) for step in range(100))


def test_warmup_then_cosine_to_the_floor(pair) -> None:
    system = DistillSystem(pair[0], warmup_steps=4, min_lr_ratio=0.1, kd_weight=0.0)
    factors = [system._lr_factor(step, total=20) for step in range(21)]
    assert factors[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert factors[4] == pytest.approx(1.0) and factors[20] == pytest.approx(0.1)
    assert factors[12] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False))


def test_bad_settings() -> None:
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="needs a loss"):
        DistillSystem(model, None, None, kd_weight=0.5)
    with pytest.raises(ValueError, match="needs a teacher model"):
        DistillSystem(model, None, ForwardKL(), lmbda=0.5)
    no_teacher = DistillSystem(model, None, ForwardKL(), kd_weight=0.5)  # KD from stored targets only
    with pytest.raises(ValueError, match="needs stored teacher targets"):
        no_teacher._teacher()
    with pytest.raises(ValueError, match="lmbda"):
        DistillSystem(model, model, ForwardKL(), lmbda=2.0)


def test_fused_linear_refuses_models_that_rescale_their_logits(pair) -> None:
    student, teacher, _ = pair
    teacher.config.final_logit_softcapping = 30.0  # Gemma-2 style: logits = 30 * tanh(logits / 30)
    with pytest.raises(ValueError, match="use system.loss_impl=chunked"):
        DistillSystem(student, teacher, ForwardKL(), loss_impl="fused_linear")
    DistillSystem(student, teacher, ForwardKL(), loss_impl="chunked")  # the chunked path uses the model's own logits


@pytest.mark.parametrize(
    ("strategy", "impl"),
    [("auto", "fused_linear"), ("ddp", "fused_linear"), ("deepspeed_stage_2", "fused_linear"),
     ("deepspeed_stage_3", "chunked"), ("fsdp", "chunked"), ("ds.json", "chunked")],
)  # fmt: skip
def test_auto_loss_impl_follows_the_strategy(strategy: str, impl: str) -> None:
    from distillprune.strategies import resolve_loss_impl

    assert resolve_loss_impl(strategy, "auto") == impl
    assert resolve_loss_impl(strategy, "dense") == "dense"
