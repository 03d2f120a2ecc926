"""Divergences between a teacher's and a student's next-token distributions.

Every loss takes logits at the positions that count, ``[N, V]`` (or ``[B, T, V]`` with ``labels`` that mark
the positions to drop with -100), divides them by the temperature, and returns the mean over positions
multiplied by T² (Hinton et al.), so that gradients keep their scale when the temperature changes.
Notation: p is the teacher's distribution, q the student's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100  # the label of a position that no loss counts (prompts, padding, demonstrations)


class Divergence(nn.Module):
    """Base class: temperature and position selection; subclasses define ``divergence``. How the training system
    computes it with CE, and on which vocabulary, is the objective's business (``distillprune.objective``).

    Args:
        temperature: softens both distributions; the loss is multiplied by its square.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None) -> Tensor:
        s, t = self._select(student_logits, teacher_logits, labels)  # [N, V], [N, V]
        if s.shape[0] == 0:
            return student_logits.sum() * 0.0  # no position counts: zero loss that keeps the graph
        temp = self.temperature
        log_q = F.log_softmax(s.float() / temp, dim=-1)
        log_p = F.log_softmax(t.float() / temp, dim=-1)
        per_position = self.divergence(log_q, log_p)  # [N]
        return per_position.mean() * temp * temp

    def divergence(self, log_q: Tensor, log_p: Tensor) -> Tensor:
        """Per-position divergence from log-probabilities ``[N, V]`` to ``[N]``."""
        raise NotImplementedError

    def _select(self, s: Tensor, t: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor]:
        if s.shape[-1] != t.shape[-1]:
            raise ValueError(
                f"student vocab ({s.shape[-1]}) and teacher vocab ({t.shape[-1]}) differ; cut both to the shared "
                "tokenizer size first (Objective(vocab_size=...)) if one of them only has padding rows"
            )
        s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
        if labels is not None:
            keep = labels.reshape(-1) != IGNORE_INDEX  # [N]
            s, t = s[keep], t[keep]
        return s, t


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) per row from log-probabilities; 0·log 0 counts as 0."""
    return torch.sum(torch.exp(log_a) * (log_a - log_b), dim=-1)


class ForwardKL(Divergence):
    """KL(p || q): mean-seeking, the classic word-level KD loss."""

    def divergence(self, log_q: Tensor, log_p: Tensor) -> Tensor:
        return _kl(log_p, log_q)


class ReverseKL(Divergence):
    """KL(q || p): mode-seeking (MiniLLM)."""

    def divergence(self, log_q: Tensor, log_p: Tensor) -> Tensor:
        return _kl(log_q, log_p)


class JSD(Divergence):
    """Generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024).

    With m = beta·p + (1 - beta)·q it is beta·KL(p || m) + (1 - beta)·KL(q || m). As in GKD, the end points are
    defined as the KLs they interpolate between: beta = 0 is forward KL(p || q), beta = 1 is reverse KL(q || p).
    """

    def __init__(
        self,
        beta: float = 0.5,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(temperature)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"JSD beta must be in [0, 1], got {beta}")
        self.beta = beta

    def divergence(self, log_q: Tensor, log_p: Tensor) -> Tensor:
        beta = self.beta
        if beta == 0.0:
            return _kl(log_p, log_q)
        if beta == 1.0:
            return _kl(log_q, log_p)
        log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
        return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)


class SkewKL(Divergence):
    """Skew KL of DistiLLM (Ko et al. 2024): KL(p || alpha·p + (1 - alpha)·q); alpha = 0 is forward KL."""

    def __init__(
        self,
        alpha: float = 0.1,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(temperature)
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"SkewKL alpha must be in [0, 1), got {alpha}")
        self.alpha = alpha

    def divergence(self, log_q: Tensor, log_p: Tensor) -> Tensor:
        if self.alpha == 0.0:
            return _kl(log_p, log_q)
        log_mix = torch.logsumexp(torch.stack([log_p + math.log(self.alpha), log_q + math.log(1 - self.alpha)]), 0)
        return _kl(log_p, log_mix)


class TVD(Divergence):
    """Total variation distance: ½·Σ|p - q|."""

    def divergence(self, log_q: Tensor, log_p: Tensor) -> Tensor:
        return 0.5 * torch.sum(torch.abs(torch.exp(log_p) - torch.exp(log_q)), dim=-1)
