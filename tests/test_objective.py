"""The chunked and fused-linear objectives equal the dense one in value and gradient, for every divergence."""

from __future__ import annotations

import pytest
import torch

from distillprune.losses import IGNORE_INDEX, JSD, TVD, ForwardKL, ReverseKL, SkewKL
from distillprune.objective import Objective

DIVERGENCES = {
    "forward_kl": lambda **kw: ForwardKL(**kw),
    "reverse_kl": lambda **kw: ReverseKL(**kw),
    "jsd_0.3": lambda **kw: JSD(0.3, **kw),
    "jsd_1": lambda **kw: JSD(1.0, **kw),
    "skew_0.1": lambda **kw: SkewKL(0.1, **kw),
    "tvd": lambda **kw: TVD(**kw),
}


def _problem(seed: int = 0, n: int = 13, h: int = 16, v: int = 41, t_pad: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)  # [N, H] student last hidden states
    head = torch.randn(v, h, generator=g) * 0.5  # [V, H]
    t_hidden = torch.randn(n, 24, generator=g)  # [N, Ht] teacher: another width
    t_head = torch.randn(v + t_pad, 24, generator=g) * 0.5  # [V', Ht]
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, head, t_hidden, t_head, targets


def _dense_reference(make, temperature, kd_weight, hidden, head, t_hidden, t_head, targets, vocab_size=None):
    hidden, head = hidden.clone().requires_grad_(True), head.clone().requires_grad_(True)
    objective = Objective(make(temperature=temperature), "dense", vocab_size=vocab_size)
    total, ce, kd = objective(hidden @ head.T, t_hidden @ t_head.T, targets, kd_weight)
    total.backward()
    return total.detach(), ce, kd, hidden.grad, head.grad


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [0, 4])
def test_chunked_and_fused_equal_dense(name: str, temperature: float, chunk: int) -> None:
    make = DIVERGENCES[name]
    problem = _problem()
    hidden, head, t_hidden, t_head, targets = problem
    ref_total, ref_ce, ref_kd, ref_gh, ref_gw = _dense_reference(make, temperature, 0.6, *problem)

    # chunked: from logits (gradient reaches hidden and head through the logits matmul)
    h, w = hidden.clone().requires_grad_(True), head.clone().requires_grad_(True)
    objective = Objective(make(temperature=temperature), "chunked", chunk_size=chunk)
    total, ce, kd = objective(h @ w.T, t_hidden @ t_head.T, targets, 0.6)
    total.backward()
    for got, want in ((total, ref_total), (ce, ref_ce), (kd, ref_kd), (h.grad, ref_gh), (w.grad, ref_gw)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    # fused linear: from hidden states and head weights
    h, w = hidden.clone().requires_grad_(True), head.clone().requires_grad_(True)
    objective = Objective(make(temperature=temperature), "fused_linear", chunk_size=chunk)
    total, ce, kd = objective.fused_linear(h, w, t_hidden, t_head, targets, 0.6)
    (2.0 * total).backward()  # an outer factor reaches the gradients
    for got, want in ((total, ref_total), (ce, ref_ce), (kd, ref_kd)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, 2.0 * ref_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, 2.0 * ref_gw, rtol=1e-5, atol=1e-6)


def test_ignored_positions_selected_as_the_system_does() -> None:
    # [B, T] labels with ignored positions: the system keeps the rows whose label counts, for every path
    hidden, head, t_hidden, t_head, _ = _problem(n=12)
    labels = torch.tensor([[3, IGNORE_INDEX, 5, 7, IGNORE_INDEX, 1], [IGNORE_INDEX] * 3 + [2, 9, 4]]).reshape(-1)
    keep = labels != IGNORE_INDEX
    dense = ForwardKL(temperature=1.5)
    s, t = (hidden @ head.T)[keep], (t_hidden @ t_head.T)[keep]
    want = dense(hidden @ head.T, t_hidden @ t_head.T, labels)  # the dense loss's own masking
    _, _, kd = Objective(ForwardKL(temperature=1.5), "chunked", chunk_size=2)(s, t, labels[keep], 1.0)
    torch.testing.assert_close(kd, want.detach())
    fused = Objective(ForwardKL(temperature=1.5), "fused_linear", chunk_size=3)
    _, _, kd = fused.fused_linear(hidden[keep], head, t_hidden[keep], t_head, labels[keep], 1.0)
    torch.testing.assert_close(kd, want.detach())


@pytest.mark.parametrize(
    ("name", "temperature", "shared"),
    [("jsd_0.3", 1.0, 41), ("forward_kl", 1.0, 41), ("forward_kl", 2.0, 41), ("forward_kl", 1.0, 37)],
)
def test_padded_teacher_vocab_and_ce_only(name: str, temperature: float, shared: int) -> None:
    # forward KL has a closed-form gradient path of its own: it is checked here with a cut vocabulary too
    hidden, head, t_hidden, t_head, targets = _problem(t_pad=7)  # teacher head has 7 padding rows
    ref = _dense_reference(DIVERGENCES[name], temperature, 0.5, hidden, head, t_hidden, t_head, targets, shared)
    h, w = hidden.clone().requires_grad_(True), head.clone().requires_grad_(True)
    objective = Objective(DIVERGENCES[name](temperature=temperature), "fused_linear", chunk_size=5, vocab_size=shared)
    total, _, _ = objective.fused_linear(h, w, t_hidden, t_head, targets, 0.5)
    total.backward()
    torch.testing.assert_close(total.detach(), ref[0])
    torch.testing.assert_close(h.grad, ref[3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, ref[4], rtol=1e-5, atol=1e-6)

    # no teacher: plain CE, chunked and fused, equals torch's cross entropy
    h = hidden.clone().requires_grad_(True)
    total, ce, kd = Objective(None, "fused_linear").fused_linear(h, head, None, None, targets, 0.0)  # no divergence
    total.backward()
    h64 = hidden.double().requires_grad_(True)
    want = torch.nn.functional.cross_entropy(h64 @ head.double().T, targets)
    want.backward()
    assert kd.item() == 0.0 and total.item() == pytest.approx(want.item(), rel=1e-6)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-5, atol=1e-7)


def test_bf16_fused_stays_close_to_dense() -> None:
    hidden, head, t_hidden, t_head, targets = (x.to(torch.bfloat16) if x.is_floating_point() else x for x in _problem())
    ref = _dense_reference(DIVERGENCES["forward_kl"], 1.0, 0.5, hidden, head, t_hidden, t_head, targets)
    h, w = hidden.clone().requires_grad_(True), head.clone().requires_grad_(True)
    total, _, _ = Objective(ForwardKL(), "fused_linear", chunk_size=4).fused_linear(
        h, w, t_hidden, t_head, targets, 0.5
    )
    total.backward()
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(total.detach(), ref[0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(h.grad.float(), ref[3].float(), rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(w.grad.float(), ref[4].float(), rtol=2e-2, atol=2e-3)


def test_empty_selection_keeps_the_graph() -> None:
    h = torch.randn(0, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    total, _, _ = Objective(ForwardKL(), "fused_linear").fused_linear(h, w, torch.randn(0, 8), w, torch.zeros(0), 0.5)
    total.backward()
    assert total.item() == 0.0 and w.grad.abs().sum() == 0


def test_bad_impl_is_an_error() -> None:
    with pytest.raises(ValueError, match="impl 'fast' is unknown; choose dense, chunked, fused_linear"):
        Objective(ForwardKL(), "fast")
