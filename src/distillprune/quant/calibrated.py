"""GPTQ and AWQ: integers chosen on calibration data, through llm-compressor (the vLLM project's library).

``calibrated_folder`` quantizes a copy of a model with llm-compressor's ``oneshot`` (GPTQ: each layer's rounding
error is compensated on the inputs' Hessian; AWQ: salient input channels are scaled up before rounding) on the
same layers as round-to-nearest (every decoder linear outside ``ignore``), and saves the compressed-tensors folder
that vLLM serves. Evaluation loads that folder back (``load_compressed``), so what is measured is what is served.

Why llm-compressor: it is the maintained library whose output vLLM loads, and it calibrates on a CPU.
Its 0.14.0.1 wheel pins transformers <= 5.17 and compressed-tensors 0.19; it runs here with the project's
transformers 5.24 and compressed-tensors 0.20 (tested), so `make install` adds it with ``--no-deps``. GPTQModel
needs CUDA torch >= 2.14.1, and AutoAWQ is deprecated.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from copy import deepcopy
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distillprune.errors import UserError
from distillprune.quant.model import config_groups, targets
from distillprune.quant.settings import CALIBRATED, Scheme


def calibrated_folder(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    scheme: Scheme,
    ids: torch.Tensor,  # [n, T] calibration windows
    out: Path,
    ignore: tuple[str, ...] = ("lm_head",),
) -> Path:
    """Quantize a copy of ``model`` with ``scheme.method`` (gptq | awq) on ``ids`` and save it as a
    compressed-tensors folder at ``out`` (written beside it, then renamed); ``model`` itself is untouched."""
    if scheme.method not in CALIBRATED:
        raise UserError(f"quantize method={scheme.method!r} does not calibrate; calibrated: {', '.join(CALIBRATED)}")
    if ids.numel() == 0:
        raise UserError(f"quantize method={scheme.method}: the calibration data is empty")
    names = sorted(targets(model, ignore))
    for name in names:
        scheme.check(name, model.get_submodule(name).weight.shape)
    from datasets import Dataset

    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "WARNING")  # not a line per layer and module (set: kept)
    from llmcompressor import oneshot

    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    work = deepcopy(model).eval()
    work.config.save_pretrained(tmp)  # oneshot reads the config of the folder a model names: this one
    work.config._name_or_path = str(tmp)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    with _cpu_without_pinned_memory():
        oneshot(
            model=work,
            processor=tokenizer,
            dataset=data,
            recipe=_modifier(scheme, names),
            max_seq_length=ids.shape[1],
            num_calibration_samples=len(ids),
            shuffle_calibration_samples=False,
            pipeline="sequential",
        )
    work.save_pretrained(tmp, save_compressed=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "recipe.yaml").unlink(missing_ok=True)  # the modifier's settings; the config says the scheme
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _modifier(scheme: Scheme, names: list[str]):  # noqa: ANN202 (llm-compressor's Modifier)
    """The GPTQ or AWQ modifier that quantizes exactly ``names`` to ``scheme``'s integers and scales."""
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier

    groups = config_groups(scheme, names)
    return GPTQModifier(config_groups=groups) if scheme.method == "gptq" else AWQModifier(config_groups=groups)


@contextlib.contextmanager
def _cpu_without_pinned_memory() -> Iterator[None]:
    """llm-compressor 0.14's AWQ pins its cached activations in page-locked memory for faster copies to a GPU,
    which a CPU-only torch refuses ("Cannot access accelerator device"); without an accelerator there is no copy
    to speed up, so pinning is skipped for the duration."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    pin = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = pin
