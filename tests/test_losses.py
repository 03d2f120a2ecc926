"""Every divergence against a plain float64 reference written from the definitions: values and gradients."""

from __future__ import annotations

import pytest
import torch

from distillprune.losses import JSD, TVD, ForwardKL, ReverseKL, SkewKL
from distillprune.objective import Objective


def _probs(logits: torch.Tensor, t: float) -> torch.Tensor:
    z = (logits / t).double()
    e = torch.exp(z - z.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * torch.log(a / b)).sum(-1)


REFERENCES = {
    "forward_kl": (lambda p, q: _kl(p, q), lambda t: ForwardKL(temperature=t)),
    "reverse_kl": (lambda p, q: _kl(q, p), lambda t: ReverseKL(temperature=t)),
    "jsd_0.5": (lambda p, q: 0.5 * _kl(p, (p + q) / 2) + 0.5 * _kl(q, (p + q) / 2), lambda t: JSD(0.5, t)),
    "jsd_0.2": (
        lambda p, q: 0.2 * _kl(p, 0.2 * p + 0.8 * q) + 0.8 * _kl(q, 0.2 * p + 0.8 * q),
        lambda t: JSD(0.2, t),
    ),
    "jsd_0_is_forward": (lambda p, q: _kl(p, q), lambda t: JSD(0.0, t)),
    "jsd_1_is_reverse": (lambda p, q: _kl(q, p), lambda t: JSD(1.0, t)),
    "skew_0.1": (lambda p, q: _kl(p, 0.1 * p + 0.9 * q), lambda t: SkewKL(0.1, t)),
    "tvd": (lambda p, q: 0.5 * (p - q).abs().sum(-1), lambda t: TVD(temperature=t)),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_matches_float64_reference(name: str, temperature: float) -> None:
    reference, make = REFERENCES[name]
    torch.manual_seed(0)
    student = (torch.randn(2, 5, 37) * 3).requires_grad_(True)  # [B, T, V]
    teacher = torch.randn(2, 5, 37) * 3
    labels = torch.tensor([[1, 2, -100, 4, 5], [-100, -100, 7, 8, 9]])  # 7 positions count

    loss = make(temperature)(student, teacher, labels)
    loss.backward()

    s64 = student.detach().double().requires_grad_(True)
    keep = labels.reshape(-1) != -100
    p = _probs(teacher.reshape(-1, 37)[keep], temperature)
    q = _probs(s64.reshape(-1, 37)[keep], temperature)
    expected = reference(p, q).mean() * temperature**2
    expected.backward()

    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(student.grad.double(), s64.grad, rtol=1e-4, atol=1e-7)
    assert student.grad.reshape(-1, 37)[~keep].abs().sum() == 0  # ignored positions get no gradient


def test_identical_distributions_give_zero() -> None:
    x = torch.randn(6, 11)
    for _, make in REFERENCES.values():
        assert make(1.5)(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_padded_vocab_rows_are_ignored() -> None:
    torch.manual_seed(1)
    student, teacher = torch.randn(4, 10), torch.randn(4, 10)
    padded_teacher = torch.cat([teacher, torch.full((4, 6), 30.0)], dim=-1)  # large logits on padding rows
    cut = ForwardKL()(*Objective(ForwardKL(), vocab_size=10).shared(student, padded_teacher))  # what the KD term sees
    assert cut.item() == pytest.approx(ForwardKL()(student, teacher).item(), rel=1e-6)


def test_vocab_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="differ"):
        ForwardKL()(torch.randn(3, 10), torch.randn(3, 12))


def test_no_counted_position_gives_zero_with_graph() -> None:
    student = torch.randn(1, 3, 8, requires_grad=True)
    loss = ReverseKL()(student, torch.randn(1, 3, 8), torch.full((1, 3), -100))
    loss.backward()
    assert loss.item() == 0.0 and student.grad.abs().sum() == 0


@pytest.mark.parametrize("bad", [lambda: JSD(beta=1.5), lambda: SkewKL(alpha=1.0), lambda: ForwardKL(temperature=0)])
def test_bad_parameters(bad) -> None:
    with pytest.raises(ValueError):
        bad()
