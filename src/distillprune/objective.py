"""The training objective (1 - w)·CE + w·KD at the target positions, three ways with the same value and gradient.

``dense``: the reference. Both models' logits ``[N, V]`` exist in full, and the float32 log-softmaxes of both
and their products are kept for backward: several ``[N, V]`` float32 tensors at the peak.

``chunked``: from the same logits, ``chunk`` rows at a time. Each chunk's float32 work and its gradient are done
inside the forward pass (the gradient with respect to the student logits is stored in their own dtype), so no
more than one chunk of float32 temporaries exists at once.

``fused_linear``: from the last hidden states and the lm_head weights. Each chunk's logits are computed, scored
and turned into gradients for the hidden states and the head weight at once (the approach of Liger's fused
linear JSD); no ``[N, V]`` tensor is ever made, for either model. It needs the head weights whole: it runs
under single device, DDP and ZeRO 1/2; under ZeRO-3 and FSDP use ``chunked``.

The teacher side is either its logits (or hidden states and head) or, from an offline store, its top-k targets
(``logit_store.TopK``): then the divergence is taken over k + 1 buckets, the k stored tokens and the rest, which
is the full divergence when k = V, on every path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distillprune.logit_store import TopK
from distillprune.losses import IGNORE_INDEX, Divergence, ForwardKL

_AUTO_CHUNK_BYTES = 32 * 2**20  # float32 logits per chunk when chunk_size is 0 ...
_MIN_AUTO_ROWS = 128  # ... but no fewer rows than this: the head-gradient matmul stays compute-bound


def shifted(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Align position t's logits with token t+1: ``[B, T, V], [B, T] -> [B, T-1, V], [B, T-1]``."""
    return logits[:, :-1], labels[:, 1:]


def token_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed next-token negative log-likelihood and the number of target tokens (for exact perplexity)."""
    logits, labels = shifted(logits, labels)
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return nll, (labels != IGNORE_INDEX).sum()


class Objective:
    """The training objective ``(1 - w)·CE + w·KD`` at the target positions.

    Args:
        divergence: the KD term (``distillprune.losses``); None for CE-only training (``w`` must then be 0).
        impl: ``dense`` (full [N, V] logits of both models in float32), ``chunked`` (from the logits,
            ``chunk_size`` rows of float32 at a time) or ``fused_linear`` (logits computed chunk by chunk from the
            last hidden states and the lm_head weights, never [N, V] at all); the same value and gradient. The
            recipes' ``auto`` is resolved by the runner (``strategies.resolve_loss_impl``).
        chunk_size: rows per chunk for the chunked paths; 0 sizes chunks to about 32 MiB of float32 logits (at
            least 128 rows).
        vocab_size: the real vocabulary shared by teacher and student. When set, the KD term sees the logits cut
            to it, so rows that one model only carries as padding (e.g. 49152 vs 49216) never enter it; CE keeps
            the student's whole vocabulary.
    """

    IMPLS = ("dense", "chunked", "fused_linear")

    def __init__(
        self,
        divergence: Divergence | None = None,
        impl: str = "dense",
        chunk_size: int = 0,
        vocab_size: int | None = None,
    ) -> None:
        if impl not in self.IMPLS:
            raise ValueError(f"impl '{impl}' is unknown; choose {', '.join(self.IMPLS)}")
        if chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0 (0: automatic), got {chunk_size}")
        self.divergence = divergence
        self.impl, self.chunk_size, self.vocab_size = impl, chunk_size, vocab_size

    def __call__(
        self, student_logits: Tensor, teacher_logits: Tensor | TopK | None, targets: Tensor, kd_weight: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(total, ce, kd)`` from logits ``[N, V]`` at the target positions (``targets`` ``[N]``) and the
        teacher's logits or stored top-k, dense or chunked (``fused_linear`` callers use ``fused_linear``). With no
        teacher, KD is 0."""
        if student_logits.shape[0] == 0:
            zero = student_logits.sum() * 0.0  # no target position: zero loss that keeps the graph
            return zero, zero.detach(), zero.detach()
        if self.impl == "dense":
            ce = F.cross_entropy(student_logits.float(), targets)
            if teacher_logits is None or self.divergence is None:
                kd = ce.new_zeros(())
            elif isinstance(teacher_logits, TopK):
                n = student_logits.shape[0]
                kd = _chunk_sums(self, student_logits.float(), teacher_logits, targets)[1] * self.temperature**2 / n
            else:
                kd = self.divergence(*self.shared(student_logits, teacher_logits))
            return (1.0 - kd_weight) * ce + kd_weight * kd, ce.detach(), kd.detach()
        chunk = self._rows_per_chunk(student_logits.shape[0], student_logits.shape[1])
        return _ChunkedKDCE.apply(student_logits, teacher_logits, targets, self, kd_weight, chunk)

    def fused_linear(
        self,
        student_hidden: Tensor,
        student_head: Tensor,
        teacher_hidden: Tensor | TopK | None,
        teacher_head: Tensor | None,
        targets: Tensor,
        kd_weight: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(total, ce, kd)`` from hidden states ``[N, Hs]`` / ``[N, Ht]`` and head weights ``[V, Hs]`` /
        ``[V', Ht]`` (or stored top-k targets and no head); gradients flow to the student's hidden states and head
        weight."""
        if student_hidden.shape[0] == 0:
            zero = student_hidden.sum() * 0.0 + student_head.sum() * 0.0
            return zero, zero.detach(), zero.detach()
        chunk = self._rows_per_chunk(student_hidden.shape[0], student_head.shape[0])
        return _FusedLinearKDCE.apply(
            student_hidden, student_head, teacher_hidden, teacher_head, targets, self, kd_weight, chunk
        )

    @property
    def temperature(self) -> float:
        """The KD temperature (1 for CE-only training, where it scales nothing)."""
        return self.divergence.temperature if self.divergence is not None else 1.0

    def shared(self, student: Tensor, teacher: Tensor | TopK) -> tuple[Tensor, Tensor | TopK]:
        """Both logits ``[N, V]`` / ``[N, V']`` cut to the shared vocabulary (``vocab_size``, when set); stored
        top-k targets were cut when they were computed."""
        if isinstance(teacher, TopK):
            return (student[..., : self.vocab_size] if self.vocab_size is not None else student), teacher
        if self.vocab_size is not None:
            return student[..., : self.vocab_size], teacher[..., : self.vocab_size]
        return student, teacher

    def _rows_per_chunk(self, n: int, vocab: int) -> int:
        if self.chunk_size:
            return self.chunk_size
        rows = max(1, _AUTO_CHUNK_BYTES // (4 * vocab))
        return min(n, max(_MIN_AUTO_ROWS, 1 << (rows.bit_length() - 1)))  # a power of two: steady matmul shapes


def _chunk_sums(obj: Objective, s32: Tensor, teacher: Tensor | TopK | None, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Summed CE (full student vocabulary, temperature 1) and summed divergence of one chunk of rows."""
    ce = F.cross_entropy(s32, targets, reduction="sum")
    if teacher is None:
        return ce, ce.new_zeros(())
    s, t = obj.shared(s32, teacher)  # [n, V] each, cut to the shared vocabulary
    temp = obj.temperature
    if isinstance(t, TopK):
        log_q, log_p = t.buckets(s / temp)  # [n, k + 1] each
    else:
        log_q = F.log_softmax(s / temp, dim=-1)
        log_p = F.log_softmax(t.float() / temp, dim=-1)
    return ce, obj.divergence.divergence(log_q, log_p).sum()


def _chunk_grad(
    obj: Objective, s32: Tensor, teacher: Tensor | TopK | None, targets: Tensor, kd_weight: float, n: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The chunk's CE and KD sums and the gradient of its share of the total with respect to ``s32``."""
    if type(obj.divergence) is ForwardKL and isinstance(teacher, Tensor):
        return _forward_kl_chunk_grad(obj, s32, teacher, targets, kd_weight, n)
    t2 = obj.temperature**2
    with torch.enable_grad():
        s32 = s32.detach().requires_grad_(True)
        ce, kd = _chunk_sums(obj, s32, teacher, targets)
        (grad,) = torch.autograd.grad(((1.0 - kd_weight) * ce + kd_weight * t2 * kd) / n, s32)
    return ce.detach(), kd.detach(), grad


def _forward_kl_chunk_grad(
    obj: Objective, s32: Tensor, teacher: Tensor, targets: Tensor, kd_weight: float, n: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``_chunk_grad`` for forward KL in closed form, without autograd: d CE / d s = softmax(s) - onehot and
    d KL(p || q_T) / d s = (q_T - p) / T on the shared vocabulary (the most used loss; a third fewer [c, V]
    passes than the generic path, and the same value and gradient)."""
    temp = obj.temperature
    s, t = obj.shared(s32, teacher)  # [c, V'] views, cut to the shared vocabulary
    shared = s.shape[1]
    log_q = F.log_softmax(s / temp, dim=-1)  # [c, V']
    log_p = F.log_softmax(t.float() / temp, dim=-1)
    p = log_p.exp()
    kd = (p * (log_p - log_q)).sum()
    log_q1 = log_q if temp == 1.0 and shared == s32.shape[1] else F.log_softmax(s32, dim=-1)  # [c, V]
    ce = -log_q1.gather(1, targets[:, None]).sum()
    grad = log_q1.exp().mul_((1.0 - kd_weight) / n)  # CE: softmax - onehot, scaled
    grad.scatter_add_(1, targets[:, None], grad.new_full((targets.shape[0], 1), -(1.0 - kd_weight) / n))
    kd_grad = (log_q if log_q1 is not log_q else log_q.detach()).exp().sub_(p).mul_(kd_weight * temp / n)
    grad[:, :shared] += kd_grad
    return ce, kd, grad


def _totals(ctx, obj: Objective, ce: Tensor, kd: Tensor, kd_weight: float, n: int) -> tuple[Tensor, Tensor, Tensor]:
    ce, kd = ce / n, kd * obj.temperature**2 / n
    total = (1.0 - kd_weight) * ce + kd_weight * kd
    ctx.mark_non_differentiable(ce, kd)
    return total, ce, kd


class _ChunkedKDCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, targets, obj, kd_weight, chunk):  # [N, V], [N, V'] | None, [N]
        n = student.shape[0]
        grad = torch.empty_like(student)  # d total / d logits, in the logits' dtype
        ce = kd = student.new_zeros((), dtype=torch.float32)
        for i in range(0, n, chunk):
            rows = slice(i, i + chunk)
            t = teacher[rows] if teacher is not None else None
            ce_c, kd_c, g = _chunk_grad(obj, student[rows].float(), t, targets[rows], kd_weight, n)
            grad[rows] = g
            ce, kd = ce + ce_c, kd + kd_c
        ctx.save_for_backward(grad)
        return _totals(ctx, obj, ce, kd, kd_weight, n)

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_kd):
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_total.to(grad.dtype)), None, None, None, None, None


class _FusedLinearKDCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, head, t_hidden, t_head, targets, obj, kd_weight, chunk):  # [N, H], [V, H], ...
        n = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden)  # [N, H]
        grad_head = torch.zeros(head.shape, dtype=torch.float32, device=head.device)  # [V, H], accumulated
        ce = kd = hidden.new_zeros((), dtype=torch.float32)
        for i in range(0, n, chunk):
            rows = slice(i, i + chunk)
            h = hidden[rows]  # [c, H]; the teacher's rows below: its logits [c, V'], its top-k, or none
            t = None if t_hidden is None else t_hidden[rows] if t_head is None else t_hidden[rows] @ t_head.T
            logits = h @ head.T  # [c, V], in the dtype the lm_head would give
            ce_c, kd_c, g = _chunk_grad(obj, logits.float(), t, targets[rows], kd_weight, n)
            g = g.to(logits.dtype)  # what the dense path hands back to the logits
            grad_hidden[rows] = g @ head
            grad_head.addmm_(g.T.to(grad_head.dtype), h.to(grad_head.dtype))
            ce, kd = ce + ce_c, kd + kd_c
        ctx.save_for_backward(grad_hidden, grad_head)
        ctx.head_dtype = head.dtype
        return _totals(ctx, obj, ce, kd, kd_weight, n)

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_kd):
        grad_hidden, grad_head = ctx.saved_tensors
        scale = grad_total.float()
        return (
            grad_hidden.mul_(scale.to(grad_hidden.dtype)),
            grad_head.mul_(scale).to(ctx.head_dtype),
            None, None, None, None, None, None,
        )  # fmt: skip
