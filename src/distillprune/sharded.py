"""Loading where the strategy shards: under ZeRO-3 and FSDP2 with several ranks no rank ever holds a whole copy of
the models it trains (the student) or serves sharded (the teacher), not even while loading them.

- FSDP2: the model is built on the meta device from its config (no memory, no random init). The system's
  ``configure_model`` shards it per decoder layer, then ``fill_shards`` gives each rank real memory for its own
  shards only and reads just those rows of every tensor from the memory-mapped safetensors files.
- ZeRO-3: the model is built inside ``deepspeed.zero.Init`` (transformers' ``HfDeepSpeedConfig`` route): each
  parameter is partitioned as it is created and filled, partition by partition, from rank 0's memory-mapped file.

What the runners measure of these models before training (validation perplexity; agreement with the teacher and
task accuracy, by synced generation) is then measured by every rank inside the strategy, at the start of ``fit``
(``BeforeTraining``), where the shards are gathered layer by layer as in any sharded forward pass.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from distillprune.errors import UserError
from distillprune.evaluation.metrics import perplexity
from distillprune.hardware import decide
from distillprune.models import (
    check_keep,
    dtype_and_attention,
    kept_layers_config,
    load_model,
    load_student,
    resolve,
    source_name,
)
from distillprune.ranks import rank_and_world

ZERO3 = ("deepspeed_stage_3", "deepspeed_stage_3_offload")


def loading(cfg: DictConfig) -> str:
    """How this run loads its models: ``fsdp`` (meta, then per-rank shards), ``zero3`` (partitioned on creation)
    or ``whole`` (every rank a full copy: one rank, or a strategy that replicates the weights)."""
    strategy, world = str(cfg.trainer.get("strategy", "auto")), rank_and_world()[1]
    if world == 1 or not (strategy == "fsdp" or strategy in ZERO3):
        return "whole"
    choice = "fsdp" if strategy == "fsdp" else "zero3"
    decide("model_loading", f"sharded ({choice})", f"trainer.strategy={strategy} on {world} ranks")
    return choice


def load_teacher(spec: DictConfig, how: str, cfg: DictConfig, device: torch.device) -> PreTrainedModel:
    """The teacher as ``how`` says (whole when the system keeps it on the CPU, outside the strategy)."""
    if how == "whole" or cfg.system.get("teacher_on_cpu", False):
        return load_model(**spec, device=device, role="teacher")
    if how == "fsdp":
        return skeleton(spec.name, spec.dtype, spec.attn_implementation, spec.trust_remote_code, device, "teacher")
    with zero3_init(cfg):
        return load_model(**spec, device=device, role="teacher")


def load_trained_student(spec: DictConfig, how: str, cfg: DictConfig, device: torch.device) -> PreTrainedModel:
    """The student as ``how`` says: ``pretrained`` and ``layer_drop`` students read only their shards (the kept
    layers of the source, under their new indices); a student of fresh random weights (``config``) is whole."""
    init = spec.get("init", "pretrained")
    if how == "whole" or init == "config":
        return load_student(**spec, device=device)
    keep = list(spec.get("keep_layers") or []) if init == "layer_drop" else None
    if init == "layer_drop" and not keep:
        return load_student(**spec, device=device)  # its one-line error names what is missing
    if how == "zero3" and keep is None:
        with zero3_init(cfg):  # transformers partitions and fills each parameter as it loads
            model = load_student(**spec, device=device)
        return model
    args = (spec.name, spec.dtype, spec.attn_implementation, spec.trust_remote_code, device, "student", keep)
    if how == "zero3":
        with zero3_init(cfg):
            model = skeleton(*args, meta=False)
        fill_partitions(model)
    else:
        model = skeleton(*args)
    if spec.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def skeleton(
    name: str,
    dtype: str = "float32",
    attn_implementation: str = "auto",
    trust_remote_code: bool = False,
    device: str | torch.device = "cpu",
    role: str = "model",
    keep_layers: list[int] | None = None,
    meta: bool = True,
) -> PreTrainedModel:
    """A model of ``name``'s config (with only its decoder layers ``keep_layers``, renumbered, when given) whose
    weights are not read yet: parameters on the meta device (``meta``; buffers real), or ZeRO-3 partitions when
    built inside ``zero3_init``. ``fill_shards`` / ``fill_partitions`` read them from the safetensors files."""
    from accelerate import init_empty_weights

    folder = _weights_folder(name)
    torch_dtype, attention = dtype_and_attention(dtype, attn_implementation, torch.device(device), role)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if keep_layers is not None:
        check_keep(keep_layers, config.num_hidden_layers)
        config = kept_layers_config(config, keep_layers)
    with init_empty_weights(include_buffers=False) if meta else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch_dtype, attn_implementation=attention, trust_remote_code=trust_remote_code
        )
    model.tie_weights()  # from_config on the meta device leaves tied embeddings apart
    with contextlib.suppress(OSError):
        model.generation_config = GenerationConfig.from_pretrained(folder)
    _SOURCES[model] = _source(model, folder, keep_layers)
    return model


def fill_shards(model: PreTrainedModel, device: torch.device) -> None:
    """Give a meta-device model that ``fully_shard`` has sharded real memory for this rank's shards on ``device``
    and read them from its safetensors files: only this rank's rows of each tensor (FSDP2 shards dim 0 in
    ``torch.chunk`` pieces). A no-op for a model whose parameters are real."""
    if not any(p.is_meta for p in model.parameters()):
        return
    buffers = {name: b.clone() for name, b in model.named_buffers()}  # built real on the CPU (rotary tables)
    model.to_empty(device=device)
    source = _SOURCES[model]
    with torch.no_grad(), source.open() as read:
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
        for name, param in model.named_parameters():  # tied weights once, under their first name
            local = param.to_local() if hasattr(param, "to_local") else param
            start = _first_row(param)
            local.copy_(read(name, slice(start, start + local.shape[0])))  # [rows, ...]


def fill_partitions(model: PreTrainedModel) -> None:
    """Read a ZeRO-3-partitioned model's weights: parameter by parameter, gathered whole for a moment, written
    by rank 0 from its memory-mapped file and partitioned again. Every rank must call it."""
    import deepspeed

    lead = rank_and_world()[0] == 0
    with torch.no_grad(), _SOURCES[model].open() as read:
        for name, param in model.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if lead:
                    param.copy_(read(name, slice(None)))


@contextlib.contextmanager
def zero3_init(cfg: DictConfig) -> Iterator[None]:
    """Models loaded inside are partitioned by ZeRO-3 as they are created (transformers' ``HfDeepSpeedConfig``),
    in the dtype DeepSpeed trains them in."""
    from transformers.integrations import HfDeepSpeedConfig

    from distillprune.strategies import build_strategy

    trainer = cfg.trainer
    strategy = build_strategy(str(trainer.strategy), str(trainer.get("accelerator", "auto")), trainer.devices)
    config = copy.deepcopy(strategy.config)
    config.setdefault("train_micro_batch_size_per_gpu", int(cfg.data.get("batch_size", 1)))
    precision = str(trainer.get("precision", "32-true"))
    if precision.startswith("bf16"):
        config.setdefault("bf16", {"enabled": True})
    elif precision.startswith("16"):
        config.setdefault("fp16", {"enabled": True})
    active = HfDeepSpeedConfig(config)  # transformers holds it by a weak reference: alive while loading
    try:
        yield
    finally:
        del active


class BeforeTraining(L.Callback):
    """Measurements of the models before the first step, taken by every rank inside the strategy (whose models
    exist only as shards); kept in checkpoints, so a resumed run reports the values of its first start.

    Args:
        measure: ``(trainer, system) -> metrics``; every rank calls it with the same work (sharded forward passes
            are collectives). The default is the validation perplexity of the teacher and the student.
    """

    def __init__(self, measure: Callable[[L.Trainer, L.LightningModule], dict[str, Any]] | None = None) -> None:
        self.measure = measure or _perplexities
        self.metrics: dict[str, Any] = {}

    def on_train_start(self, trainer: L.Trainer, system: L.LightningModule) -> None:
        if not self.metrics:
            self.metrics = self.measure(trainer, system)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.metrics)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.metrics = dict(state_dict)


def _perplexities(trainer: L.Trainer, system: L.LightningModule) -> dict[str, Any]:
    loader = trainer.datamodule.val_dataloader()
    out = {"teacher": perplexity(system.teacher, loader)} if getattr(system, "teacher", None) is not None else {}
    return out | {"student_init": perplexity(system.student, loader)}


def resident_numel(model: torch.nn.Module) -> int:
    """Parameter elements this rank holds in memory: its shards, partitions, or the whole model."""
    total = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            total += p.ds_tensor.numel()
        elif hasattr(p, "to_local"):
            total += 0 if p.is_meta else p.to_local().numel()
        else:
            total += 0 if p.is_meta else p.numel()
    return total


def weights_source(model: PreTrainedModel) -> WeightsSource:
    """Where a skeleton's weights are read from (each parameter's tensor name and file)."""
    return _SOURCES[model]


def _first_row(param: torch.Tensor) -> int:
    """The first dim-0 row of ``param``'s local shard (FSDP2: ``torch.chunk`` pieces, the last ones may be short)."""
    if not hasattr(param, "device_mesh"):
        return 0
    mesh = param.device_mesh
    rows = math.ceil(param.shape[0] / mesh.size())
    return min(mesh.get_local_rank() * rows, param.shape[0])


def _weights_folder(name: str) -> Path:
    location = resolve(name)
    if Path(location).is_dir():
        return Path(location)
    from huggingface_hub import snapshot_download

    try:  # the files from_pretrained would fetch: config, generation config, safetensors weights
        return Path(snapshot_download(location, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as err:  # noqa: BLE001 - hub errors come in many kinds
        raise UserError(f"could not load '{name}' from the hub: {str(err).splitlines()[0]}") from None


@dataclasses.dataclass
class WeightsSource:
    """Where a skeleton's weights are: each parameter's tensor name in the safetensors files, and its file."""

    names: dict[str, str]  # model parameter -> tensor name in the files
    files: dict[str, Path]  # tensor name -> file

    @contextlib.contextmanager
    def open(self) -> Iterator[Callable[[str, slice], torch.Tensor]]:
        """A reader ``(parameter, rows) -> tensor`` over the memory-mapped files (only those rows are read)."""
        from safetensors import safe_open

        with contextlib.ExitStack() as stack:
            handles = {f: stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
                       for f in set(self.files.values())}  # fmt: skip

            def read(param: str, rows: slice) -> torch.Tensor:
                name = self.names[param]
                return handles[self.files[name]].get_slice(name)[rows]

            yield read


_SOURCES: weakref.WeakKeyDictionary[torch.nn.Module, WeightsSource] = weakref.WeakKeyDictionary()


def _source(model: PreTrainedModel, folder: Path, keep_layers: list[int] | None) -> WeightsSource:
    """Each parameter's tensor in ``folder``'s safetensors files (kept layers under their source indices); a
    one-line error when one is missing (no safetensors, or names that transformers renames on loading)."""
    from safetensors import safe_open

    files = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            files |= dict.fromkeys(f.keys(), file)  # noqa: SIM118 - safe_open is not iterable
    if not files:
        raise UserError(f"{folder} has no safetensors weights; sharded loading reads only safetensors")
    names = {}
    for name, _ in model.named_parameters():
        name_in_file = source_name(name, keep_layers) if keep_layers is not None else name
        if name_in_file not in files:
            raise UserError(
                f"{folder}: no tensor '{name_in_file}' for {type(model).__name__}; this checkpoint cannot be "
                "loaded in shards (use trainer.strategy=deepspeed_stage_2 or ddp)"
            )
        names[name] = name_in_file
    return WeightsSource(names, files)
