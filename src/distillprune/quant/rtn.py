"""Round-to-nearest weight quantization: integers, scales and zero points of a ``[out, in]`` weight.

The grid of one block of weights (the whole tensor, one output row, or ``group_size`` consecutive inputs of a row):

- symmetric, ``b`` bits: ``scale = max|w| / (2^(b-1) - 1)``, ``q = clamp(round(w / scale), -2^(b-1), 2^(b-1) - 1)``,
  ``w' = q * scale`` (zero maps to zero; the most negative level is left unused, as GPTQ and llama.cpp's Q8_0 do);
- asymmetric (zero point): ``lo = min(w, 0)``, ``hi = max(w, 0)``, ``scale = (hi - lo) / (2^b - 1)``,
  ``zero = clamp(round(-lo / scale), 0, 2^b - 1)``, ``q = clamp(round(w / scale) + zero, 0, 2^b - 1)``,
  ``w' = (q - zero) * scale`` (0 stays exactly representable, as compressed-tensors and GPTQ require).

A block of zeros gets scale 1 (its integers are all ``zero``). ``round`` is torch's round-half-to-even.
``fake_quantize`` is ``w'`` in the forward pass and the identity in the backward pass (straight-through), for
quantization-aware training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distillprune.errors import UserError
from distillprune.quant.settings import Scheme


@dataclass
class Quantized:
    """One weight on its grid: ``q`` [O, I] integers, ``scale`` and ``zero`` [O, I / block] (one per block; for a
    per-tensor scheme [1, 1])."""

    q: torch.Tensor  # [O, I] int16 (holds every supported width, signed or not)
    scale: torch.Tensor  # [O, G] float32
    zero: torch.Tensor  # [O, G] int16; zeros when symmetric
    scheme: Scheme

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(q - zero) * scale``, back in ``[O, I]``."""
        blocks = _blocks(self.q, self.scheme).to(torch.float32)  # [O', G, g]
        w = (blocks - self.zero.reshape(*blocks.shape[:2], 1)) * self.scale.reshape(*blocks.shape[:2], 1)
        return w.reshape(self.q.shape).to(dtype)


def _blocks(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """``w`` [O, I] as [O', G, g]: the blocks that share a scale along the last axis."""
    out, width = w.shape
    if scheme.granularity == "tensor":
        return w.reshape(1, 1, out * width)
    if scheme.granularity == "channel":
        return w.reshape(out, 1, width)
    return w.reshape(out, width // scheme.group_size, scheme.group_size)


def quantize(w: torch.Tensor, scheme: Scheme, name: str = "weight") -> Quantized:
    """Round ``w`` [O, I] to the nearest point of ``scheme``'s grid."""
    if w.ndim != 2:
        raise UserError(f"quantize expects a 2-D [out, in] weight, {name} has shape {tuple(w.shape)}")
    scheme.check(name, w.shape)
    blocks = _blocks(w.detach().to(torch.float32), scheme)  # [O', G, g]
    qmin, qmax = scheme.levels()
    if scheme.symmetric:
        scale = blocks.abs().amax(-1) / qmax  # [O', G]
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.zeros_like(scale)
        q = torch.clamp(torch.round(blocks / scale[..., None]), qmin, qmax)
    else:
        lo, hi = blocks.amin(-1).clamp(max=0), blocks.amax(-1).clamp(min=0)  # [O', G]
        scale = (hi - lo) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.clamp(torch.round(-lo / scale), qmin, qmax)
        q = torch.clamp(torch.round(blocks / scale[..., None]) + zero[..., None], qmin, qmax)
    return Quantized(q.reshape(w.shape).to(torch.int16), scale, zero.to(torch.int16), scheme)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, scheme: Scheme) -> torch.Tensor:  # type: ignore[override]
        return quantize(w, scheme).dequantize(w.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def fake_quantize(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """``w`` rounded to the grid in the forward pass; the gradient passes through unchanged (straight-through)."""
    return _StraightThrough.apply(w, scheme)
