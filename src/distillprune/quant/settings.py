"""What a recipe's ``quantize`` block may say, checked without torch (``validate`` runs it before any model is
loaded): the round-to-nearest ``Scheme``, the GGUF types this installation writes, and whether every scheme's
groups tile the widths that the model will have when it is quantized."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from distillprune.errors import UserError

GRANULARITIES = ("tensor", "channel", "group")
BITS = (2, 3, 4, 5, 6, 7, 8)
# round-to-nearest here; GPTQ and AWQ through llm-compressor, at the widths vLLM's compressed-tensors W4A16 /
# W8A16 kernels serve, per channel or per group (both calibrate each output channel's scales on data)
METHODS = {"rtn": BITS, "gptq": (4, 8), "awq": (4, 8)}
CALIBRATED = ("gptq", "awq")
NAMES = {"rtn": "round-to-nearest", "gptq": "GPTQ", "awq": "AWQ"}


@dataclass(frozen=True)
class Scheme:
    """How one weight is quantized: ``bits``, symmetric or with a zero point, the size of a block that shares
    a scale (``granularity``: one per tensor, per output channel, or per ``group_size`` inputs of a channel), and
    the ``method`` that picks the integers: round-to-nearest (``rtn``) or, on calibration data, ``gptq`` / ``awq``."""

    bits: int = 4
    symmetric: bool = True
    granularity: str = "group"
    group_size: int = 128
    method: str = "rtn"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"quantize method={self.method!r}; choose one of {', '.join(METHODS)}")
        if self.bits not in METHODS[self.method]:
            raise UserError(
                f"quantize bits={self.bits} is not supported by {NAMES[self.method]}; "
                f"choose one of {METHODS[self.method]}"
            )
        if self.granularity not in GRANULARITIES:
            raise UserError(f"quantize granularity={self.granularity!r}; choose one of {', '.join(GRANULARITIES)}")
        if self.method in CALIBRATED and self.granularity == "tensor":
            raise UserError(f"quantize method={self.method} scales per channel or group; not granularity=tensor")
        if self.granularity == "group" and self.group_size < 1:
            raise UserError(f"quantize group_size={self.group_size} must be a positive number of inputs")

    @classmethod
    def of(cls, spec: dict[str, Any]) -> Scheme:
        """A scheme from a recipe's mapping; a key that is not a field is a one-line error naming the fields."""
        fields = ("bits", "symmetric", "granularity", "group_size", "method")
        if unknown := sorted(set(spec) - set(fields)):
            raise UserError(f"quantize scheme {dict(spec)}: unknown key(s) {unknown}; a scheme has {', '.join(fields)}")
        return cls(**spec)

    @property
    def name(self) -> str:
        """``int4-g128``, ``int8-channel``, ``int4-tensor-asym``, ``int4-g64-gptq``: the scheme in the tables."""
        block = f"g{self.group_size}" if self.granularity == "group" else self.granularity
        method = "" if self.method == "rtn" else f"-{self.method}"
        return f"int{self.bits}-{block}" + ("" if self.symmetric else "-asym") + method

    def levels(self) -> tuple[int, int]:
        """The smallest and largest integer of the grid."""
        if self.symmetric:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    def check(self, name: str, weight_shape: tuple[int, ...]) -> None:
        """A group must tile the input width: a one-line error naming the weight and the widths that would fit."""
        width = weight_shape[-1]
        if self.granularity == "group" and width % self.group_size:
            fits = [g for g in (32, 64, 128, 256) if width % g == 0]
            raise UserError(
                f"quantize group_size={self.group_size} does not divide the input width {width} of {name}; "
                f"group sizes that do: {fits or 'none of 32/64/128/256'} (or granularity=channel)"
            )


NUMPY_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q4_1", "Q4_0")
LLAMA_CPP_TYPES = {"Q4_K_M": 15, "Q4_K_S": 14, "Q5_K_M": 17, "Q6_K": 18}  # llama_ftype of llama.cpp's quantizer
TYPES = NUMPY_TYPES + tuple(LLAMA_CPP_TYPES)

GGUF_FAMILIES = ("llama", "mistral", "distillprune_llama", "distillprune_mistral")  # llama.cpp's llama graph


def check_type(qtype: str) -> None:
    """A type this installation can write, or a one-line error naming the ones it can."""
    if qtype not in TYPES:
        raise UserError(f"unknown GGUF type {qtype!r}; types: {', '.join(TYPES)}")
    if qtype in LLAMA_CPP_TYPES and importlib.util.find_spec("llama_cpp") is None:
        raise UserError(
            f"GGUF type {qtype} needs llama.cpp's quantizer, and llama-cpp-python is not installed "
            f"(pip install llama-cpp-python, or `make bench`); without it: {', '.join(NUMPY_TYPES)}"
        )


def check_block(q: Any, widths: dict[str, int], free: dict[str, int], model_type: str | None = None) -> None:
    """Every scheme and GGUF type of a ``quantize`` block is valid, and every scheme's groups tile ``widths``
    (input widths of the linear layers, from the config: ``{what: width}``) and ``free`` (widths pruning may
    change, ``{what: the multiple they keep}``: 1 means any width)."""
    for t in q.gguf.types:
        check_type(str(t))
    run = str(q.gguf.llama_cpp)
    if run not in ("auto", "true", "True", "false", "False"):
        raise UserError(f"quantize.gguf.llama_cpp={run!r}; choose auto, true or false")
    if run in ("true", "True") and importlib.util.find_spec("llama_cpp") is None:
        raise UserError("quantize.gguf.llama_cpp=true needs llama-cpp-python (pip install llama-cpp-python)")
    if list(q.gguf.types) and model_type is not None and model_type not in GGUF_FAMILIES:
        raise UserError(
            f"quantize.gguf.types: GGUF export knows the Llama family ({', '.join(GGUF_FAMILIES)}), not {model_type!r}"
        )
    schemes = [Scheme.of(dict(spec)) for spec in q.schemes]
    if any(s.method in CALIBRATED for s in schemes):
        check_calibration(q)
    for scheme in schemes:
        if scheme.granularity != "group":
            continue
        for what, width in widths.items():
            scheme.check(what, (0, width))
        for what, multiple in free.items():
            if multiple % scheme.group_size:
                raise UserError(
                    f"quantize group_size={scheme.group_size}: {what} can be pruned to any multiple of {multiple}, "
                    f"which the groups may not tile; make it a multiple of {scheme.group_size}"
                )


def check_calibration(q: Any) -> None:
    """GPTQ / AWQ schemes need llm-compressor and a non-empty ``quantize.calibration`` block."""
    if importlib.util.find_spec("llmcompressor") is None:
        raise UserError(
            "quantize method gptq/awq needs llm-compressor, which `make install` adds "
            "(pip install --no-deps llmcompressor==0.14.0.1 auto-round==0.15.1)"
        )
    c = q.get("calibration")
    if c is None or not c.get("source") or int(c.get("samples") or 0) < 1 or int(c.get("seq_len") or 0) < 1:
        raise UserError(
            "quantize method gptq/awq calibrates on data: set quantize.calibration.source, samples >= 1, seq_len >= 1"
        )


def quantized_widths(config: dict, prune: Any = None) -> tuple[dict[str, int], dict[str, int]]:
    """The input widths of a model's linear layers from its ``config.json`` (``{}`` when unknown), and those a
    ``prune`` block may change, with the multiple each keeps (MLP channels: ``round_to``; heads: ``head_dim``)."""
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if not isinstance(hidden, int) or not isinstance(heads, int) or "layer_widths" in config:
        return {}, {}
    head_dim = config.get("head_dim") or hidden // heads
    widths = {"the hidden size": hidden, "the MLP width": config.get("intermediate_size") or 0}
    widths["the attention output"] = heads * head_dim
    free: dict[str, int] = {}
    parts = list(prune.get("parts", [])) if prune is not None else []
    if "channels" in parts:
        free[f"the MLP width (prune.round_to={prune.get('round_to', 1)})"] = int(prune.get("round_to", 1))
        widths.pop("the MLP width")
    if "heads" in parts:
        free[f"the attention output (heads of {head_dim})"] = head_dim
        widths.pop("the attention output")
    return {k: v for k, v in widths.items() if v}, free


def check_aware(q: Any, cfg: Any) -> Scheme | None:
    """``quantize.aware``: the scheme a training recipe trains its model fake-quantized on (None: off)."""
    aware = q.get("aware")
    if aware is None:
        return None
    scheme = Scheme.of(dict(aware))
    if cfg.get("trainer") is None:
        raise UserError("quantize.aware trains on a grid: it needs a training recipe (compress, logit_distill, ...)")
    if cfg.get("lora") is not None:
        raise UserError("quantize.aware trains the whole model; this recipe trains LoRA adapters (use compress)")
    strategy = str(cfg.trainer.get("strategy", "auto"))
    if strategy == "fsdp" or strategy.startswith("deepspeed_stage_3"):
        raise UserError(f"quantize.aware runs on whole weights; trainer.strategy={strategy} shards them (use ddp)")
    return scheme
