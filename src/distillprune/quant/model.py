"""A whole model on a grid: every linear layer of the decoder rounded (``quantize_model``), then saved as a
compressed-tensors folder (``save_compressed``): packed integers plus scales and zero points, the format that vLLM
serves and that transformers loads (``from_pretrained`` with compressed-tensors installed) back to the same weights.

Embeddings, norms and the output layer stay in the model's dtype (``ignore``), as GPTQ/AWQ checkpoints keep them.
"""

from __future__ import annotations

import os
import re
import shutil
from copy import deepcopy
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distillprune.errors import UserError
from distillprune.quant.rtn import Quantized, fake_quantize, quantize
from distillprune.quant.settings import Scheme


def targets(model: PreTrainedModel, ignore: tuple[str, ...] = ("lm_head",)) -> dict[str, nn.Linear]:
    """The linear layers that get quantized: every ``nn.Linear`` whose name is not (under) one in ``ignore``."""
    found = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(name == i or name.startswith(f"{i}.") for i in ignore)
    }
    if not found:
        raise UserError(f"nothing to quantize: no linear layers outside {list(ignore)}")
    return found


def checked_targets(model: PreTrainedModel, scheme: Scheme, ignore: tuple[str, ...] = ("lm_head",)) -> dict:
    """``targets``, each checked against ``scheme`` (groups tile its input width) before any is changed."""
    layers = targets(model, ignore)
    for name, linear in layers.items():
        scheme.check(name, linear.weight.shape)
    return layers


def quantize_model(model: PreTrainedModel, scheme: Scheme, ignore: tuple[str, ...] = ("lm_head",)) -> dict:
    """Round every target's weight to ``scheme``'s grid in place (the weights become the dequantized values, so
    the model runs as it will after loading); returns ``{name: Quantized}`` for saving."""
    layers = checked_targets(model, scheme, ignore)
    done = {}
    with torch.no_grad():
        for name, linear in layers.items():
            q = quantize(linear.weight, scheme, name)
            linear.weight.copy_(q.dequantize(linear.weight.dtype))
            done[name] = q
    return done


def stored_bytes(model: PreTrainedModel, quantized: dict[str, Quantized]) -> int:
    """Bytes of the weights as stored: ``bits`` per quantized integer plus its scales (and zero points), every
    other tensor at its dtype (a tied embedding once)."""
    seen, total = set(), 0
    skip = {f"{name}.weight" for name in quantized}
    for name, p in model.named_parameters(remove_duplicate=True):
        if name in skip or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    for q in quantized.values():
        total += q.q.numel() * q.scheme.bits // 8 + q.scale.numel() * 4
        total += 0 if q.scheme.symmetric else q.zero.numel() * q.scheme.bits // 8
    return total


def save_compressed(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    quantized: dict[str, Quantized],
    scheme: Scheme,
    out: Path,
) -> Path:
    """Save a ``quantize_model``-ed model as a compressed-tensors folder (atomically: written beside ``out``, then
    renamed). The integers and scales written are exactly ``quantized``'s, so loading gives the same weights."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, apply_quantization_config

    names = sorted(quantized)
    config = QuantizationConfig(
        config_groups=config_groups(scheme, names), quantization_status=QuantizationStatus.FROZEN
    )
    copy = deepcopy(model).eval()  # compression replaces the copy's parameters
    apply_quantization_config(copy, config, show_progress=False)
    # compressed-tensors' integers are signed: an unsigned grid [0, 2^b - 1] with zero z is [-2^(b-1), ...] with
    # zero z - 2^(b-1), the same weights (q - z) * scale
    offset = 0 if scheme.symmetric else 2 ** (scheme.bits - 1)
    with torch.no_grad():
        for name in names:
            module, q = copy.get_submodule(name), quantized[name]
            module.weight_scale.copy_(q.scale.reshape(module.weight_scale.shape))
            if hasattr(module, "weight_zero_point"):
                zero = (q.zero.to(torch.int32) - offset).reshape(module.weight_zero_point.shape)
                module.weight_zero_point.copy_(zero.to(module.weight_zero_point.dtype))
            module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(copy)
    compressor.compress_model(copy)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    copy.save_pretrained(tmp)
    compressor.update_config(str(tmp))
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def config_groups(scheme: Scheme, names: list[str]) -> dict:
    """compressed-tensors' description of ``scheme`` on exactly the linear layers ``names``: integer weights of
    ``bits``, symmetric or with a zero point, one scale per tensor / channel / group."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(
        num_bits=scheme.bits,
        type="int",
        symmetric=scheme.symmetric,
        strategy=scheme.granularity,
        group_size=scheme.group_size if scheme.granularity == "group" else None,
    )
    return {"group_0": QuantizationScheme(targets=[f"re:^{re.escape(n)}$" for n in names], weights=args)}


def load_compressed(folder: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A compressed-tensors folder loaded as transformers does, its weights dequantized into plain linears."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, quantization_config=CompressedTensorsConfig(dequantize=True)
    )


class _FakeQuantized(nn.Module):
    """A weight parametrization: the weight on ``scheme``'s grid forward, the gradient straight through."""

    def __init__(self, scheme: Scheme) -> None:
        super().__init__()
        self.scheme = scheme

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize(weight, self.scheme)


def train_fake_quantized(model: PreTrainedModel, scheme: Scheme, ignore: tuple[str, ...] = ("lm_head",)) -> int:
    """Quantization-aware training: from now on every target's weight is used on ``scheme``'s grid (the float
    weights underneath get the straight-through gradient); returns how many layers. ``end_fake_quantized``
    undoes it, leaving the trained float weights, which ``quantize_model`` with the same scheme rounds to
    exactly the weights the training used."""
    from torch.nn.utils import parametrize

    layers = checked_targets(model, scheme, ignore)
    for linear in layers.values():
        parametrize.register_parametrization(linear, "weight", _FakeQuantized(scheme))
    return len(layers)


def end_fake_quantized(model: nn.Module) -> None:
    """Remove ``train_fake_quantized``'s parametrizations, keeping the float weights they were computed from."""
    from torch.nn.utils import parametrize

    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
