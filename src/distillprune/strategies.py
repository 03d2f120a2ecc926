"""Scale-out from the recipe's ``trainer.strategy``: DDP, DeepSpeed ZeRO 1/2/3 (with offload, or a DeepSpeed JSON
config passed through) and FSDP2, by the same code on CUDA and on the CPU (gloo), so the tests run what users run.

Lightning's ``DeepSpeedStrategy`` refuses anything but CUDA; ``DeepSpeed`` below lifts only that: it sets up the
process group like DDP, takes world ranks without a device index, and gives ``deepspeed.initialize`` the local rank
as ``device_rank`` where a CPU device has no index. ``fsdp`` is FSDP2: Lightning's ``ModelParallelStrategy`` over
a 1-D data-parallel mesh, with ``fully_shard`` applied per decoder layer in the system's ``configure_model``.

Sharded checkpoints (ZeRO and FSDP write a folder per checkpoint, each rank its shard) are written to
``<name>.tmp`` and renamed into place once every rank is done, so a kill never leaves a half-written one. The
final model is always gathered into one plain Hugging Face model on rank 0 (``trained_student``).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy, Strategy
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from distillprune.choices import STRATEGIES
from distillprune.errors import UserError
from distillprune.hardware import check_devices, decide

log = logging.getLogger(__name__)

ZERO = {
    "deepspeed_stage_1": {"stage": 1},
    "deepspeed_stage_2": {"stage": 2},
    "deepspeed_stage_2_offload": {"stage": 2, "offload_optimizer": True},
    "deepspeed_stage_3": {"stage": 3},
    "deepspeed_stage_3_offload": {"stage": 3, "offload_optimizer": True, "offload_parameters": True},
}
CHOICES = (*STRATEGIES, "a DeepSpeed config .json")
SHARDED = ("deepspeed_stage_3", "deepspeed_stage_3_offload", "fsdp")  # parameters exist only as shards


def build_strategy(name: str, accelerator: str = "auto", devices: int | str = "auto") -> str | Strategy:
    """The Lightning strategy for ``trainer.strategy``; bad names and impossible requests are one-line errors."""
    check_devices(accelerator, devices)
    if name in ("auto", "ddp"):
        return name
    if name in ZERO:
        options = ZERO[name]
        if options.get("offload_optimizer"):
            _check_cpu_adam(name)
        return DeepSpeed(**options, exclude_frozen_parameters=True)
    if name.endswith(".json"):
        if not Path(name).is_file():
            raise UserError(f"trainer.strategy={name}: no such DeepSpeed config file")
        return DeepSpeed(config=name, exclude_frozen_parameters=True)
    if name == "fsdp":
        return FSDP2()
    raise UserError(f"trainer.strategy '{name}' is unknown; choose {', '.join(CHOICES)}")


def resolve_loss_impl(strategy: str, impl: str) -> str:
    """The loss implementation to run: ``auto`` is ``fused_linear`` (least memory, fastest) where the lm_head
    weights exist whole, ``chunked`` where parameters exist only as shards (ZeRO-3, FSDP, a DeepSpeed .json);
    an explicit ``fused_linear`` under sharding is a one-line error."""
    sharded = strategy in SHARDED or strategy.endswith(".json")
    if impl == "auto":
        if sharded:
            return decide("loss_impl", "chunked", f"trainer.strategy={strategy} shards the lm_head")
        return decide("loss_impl", "fused_linear", "whole lm_head weights: least memory, fastest")
    if impl == "fused_linear" and sharded:
        raise UserError(
            f"system.loss_impl=fused_linear needs whole lm_head weights; under trainer.strategy={strategy} use "
            "system.loss_impl=chunked (or deepspeed_stage_2 / ddp for fused_linear)"
        )
    return impl


def adamw(strategy: Strategy, precision: Precision | None = None) -> Callable[..., torch.optim.Optimizer]:
    """AdamW for the strategy: DeepSpeed's CPU Adam (AdamW mode) when ZeRO offloads the optimizer; torch's fused
    AdamW (one kernel for all parameters) where parameters are plain tensors (one device, DDP) and no loss scaler
    runs (a scaled fp16 loss would have to be unscaled before clipping, which fused AdamW does internally); else
    torch's multi-tensor (foreach) AdamW."""
    zero = (getattr(strategy, "config", None) or {}).get("zero_optimization", {})
    if isinstance(strategy, DeepSpeedStrategy):
        if zero.get("offload_optimizer"):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            decide("optimizer", "DeepSpeedCPUAdam", "ZeRO offloads the optimizer to the CPU")
            return lambda groups, **kw: DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
        decide("optimizer", "AdamW", "DeepSpeed steps it on its own flat partitions")
        return torch.optim.AdamW
    if isinstance(strategy, ModelParallelStrategy):
        decide("optimizer", "AdamW (foreach)", "FSDP2 parameters are DTensor shards")
        return torch.optim.AdamW
    if getattr(precision, "scaler", None) is not None:
        decide("optimizer", "AdamW (foreach)", "fp16 loss scaling: gradients are unscaled before clipping")
        return torch.optim.AdamW
    decide("optimizer", "AdamW (fused)", "plain tensors on one device per rank")
    return lambda groups, **kw: torch.optim.AdamW(groups, fused=True, **kw)


def fsdp2_policy(precision: str) -> Any:
    """FSDP2's mixed-precision policy for ``trainer.precision``: under ``bf16-mixed`` the shards are gathered
    and computed in bfloat16 (half the all-gather traffic and memory) while the float32 shards stay the master
    weights and gradients are reduced in float32; None (the shards' own dtype) otherwise."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision != "bf16-mixed":
        decide("fsdp_mixed_precision", "none", f"trainer.precision={precision}: compute in the shards' dtype")
        return None
    decide("fsdp_mixed_precision", "bf16 params, fp32 reduce", "trainer.precision=bf16-mixed")
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard_fsdp2(model: nn.Module, mesh: Any, reshard_after_forward: bool = True, mp_policy: Any = None) -> None:
    """FSDP2: ``fully_shard`` every decoder layer (the classes in ``_no_split_modules``), then the whole model."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = mp_policy if mp_policy is not None else MixedPrecisionPolicy()
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)


def trained_student(trainer: Any, student: PreTrainedModel) -> PreTrainedModel | None:
    """The student after ``fit`` as one plain float32 model on global rank 0, on its device (None elsewhere).
    Under DeepSpeed its trained weights are the optimizer's float32 masters; under ZeRO-3 and FSDP they are
    gathered from the shards into a fresh model of the same config (a PEFT model: a fresh PEFT model, which the
    caller merges). Parameters are gathered one at a time and only rank 0 keeps them, in CPU memory, so no rank
    ever holds a second full copy of the model. Every rank must call it."""
    strategy = trainer.strategy
    deepspeed = isinstance(strategy, DeepSpeedStrategy)
    sharded = isinstance(strategy, ModelParallelStrategy) or (deepspeed and strategy.zero_stage_3)
    lead = trainer.is_global_zero
    if isinstance(strategy, ModelParallelStrategy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 only, tensor by tensor
        state = get_model_state_dict(student, options=options)
    elif deepspeed:
        state = {name: t for name, t in _deepspeed_params(student, keep=lead) if t is not None}
    if not lead:
        return None
    if not sharded:
        if deepspeed:  # DeepSpeed may train a bf16 copy: take the float32 masters back
            with torch.no_grad():
                for name, p in student.named_parameters():
                    p.data = state[name].to(p.device)
        return student.float()
    plain = _fresh_like(student)
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)  # the gathered tensors themselves
    plain.tie_weights()
    if unexpected or set(missing) - _tied_keys(plain):
        raise RuntimeError(f"gathered student does not fit its config: missing {missing}, unexpected {unexpected}")
    return plain.to(strategy.root_device)


def _deepspeed_params(student: nn.Module, keep: bool):  # noqa: ANN202 - a generator of (name, tensor | None)
    """Each parameter whole in float32: the optimizer's master for trained ones, the gathered partition for
    frozen ones under ZeRO-3; one at a time (a collective under ZeRO-3), on the CPU where ``keep``."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    for name, p in student.named_parameters():
        if p.requires_grad:
            full = safe_get_full_fp32_param(p)
        else:
            with deepspeed.zero.GatheredParameters([p]):
                full = p.detach().float().clone()
        yield name, (full.cpu() if keep else None)
        del full


def _fresh_like(student: PreTrainedModel) -> PreTrainedModel:
    """A float32 model of the student's config with its parameters on the meta device (no memory, no random
    init: the gathered weights are assigned in), buffers real; a PEFT model around one, with the same adapters."""
    from accelerate import init_empty_weights
    from peft import PeftModel, get_peft_model

    base = student.get_base_model() if isinstance(student, PeftModel) else student
    with init_empty_weights():
        plain = AutoModelForCausalLM.from_config(copy.deepcopy(base.config), dtype=torch.float32)
        if isinstance(student, PeftModel):
            plain = get_peft_model(plain, copy.deepcopy(student.peft_config["default"]))
    (plain.get_base_model() if isinstance(plain, PeftModel) else plain).generation_config = copy.deepcopy(
        base.generation_config
    )
    return plain


def _tied_keys(model: PreTrainedModel) -> set[str]:
    seen: dict[int, str] = {}
    tied = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            tied |= {name, seen[id(tensor)]}
        seen[id(tensor)] = name
    return tied


class DeepSpeed(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy, also on the CPU (gloo); unchanged on CUDA. Checkpoints are atomic."""

    strategy_name = "deepspeed_any_device"

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skips only the parent's "CUDA only" check

    def setup_distributed(self) -> None:
        if self.root_device.type == "cuda":
            super().setup_distributed()
            return
        import deepspeed

        # gloo does the CPU collectives; DeepSpeed's shared-memory all-reduce would first be compiled (a minute)
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):  # noqa: ANN001
        import argparse

        import deepspeed

        device_rank = self.root_device.index if self.root_device.index is not None else self.local_rank
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=device_rank),
            config=self.config,
            model=model,
            model_parameters=filter(lambda p: p.requires_grad, model.parameters()),
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any = None) -> None:
        _atomic_folder(self, lambda tmp: super(DeepSpeed, self).save_checkpoint(checkpoint, tmp, storage_options),
                       filepath)  # fmt: skip


class FSDP2(ModelParallelStrategy):
    """FSDP2 through Lightning's ModelParallelStrategy: every rank one data-parallel shard, no tensor parallelism;
    sharded checkpoints written atomically."""

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any = None) -> None:
        _atomic_folder(self, lambda tmp: super(FSDP2, self).save_checkpoint(checkpoint, tmp, storage_options),
                       filepath)  # fmt: skip

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        from lightning.fabric.strategies.model_parallel import _load_checkpoint

        # checkpoints hold no teacher (it is reloaded from its source): load every other part of the system
        saved = nn.Module()
        for name, child in self.lightning_module.named_children():
            if name != "teacher":
                saved.add_module(name, child)
        state = {"state_dict": saved, **{f"optimizer_{i}": opt for i, opt in enumerate(self.optimizers)}}
        path = Path(self.broadcast(str(checkpoint_path)))
        return _load_checkpoint(path, state, strict=True, optimizer_states_from_list=True, weights_only=weights_only)


def _atomic_folder(strategy: Strategy, save: Callable[[str], None], filepath: Any) -> None:
    path = str(strategy.broadcast(str(filepath)))
    tmp = path + ".tmp"
    if strategy.is_global_zero:
        shutil.rmtree(tmp, ignore_errors=True)
    strategy.barrier()
    save(tmp)
    strategy.barrier()
    if strategy.is_global_zero:
        old = path + ".old"
        if os.path.lexists(path):
            os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    strategy.barrier()


def _check_cpu_adam(name: str) -> None:
    """ZeRO offload steps the optimizer with DeepSpeed's cpu_adam op: prebuilt, or compiled on first use."""
    from deepspeed.git_version_info import installed_ops
    from deepspeed.ops.op_builder import CPUAdamBuilder

    if installed_ops.get("cpu_adam"):
        return
    builder = CPUAdamBuilder()
    if shutil.which("ninja") is None or not builder.is_compatible(verbose=False):
        raise UserError(
            f"trainer.strategy={name} needs DeepSpeed's cpu_adam op, which is neither prebuilt nor buildable here "
            "(needs ninja and a C++ compiler); install with DS_BUILD_CPU_ADAM=1 or use a strategy without _offload"
        )
    log.info("%s: DeepSpeed's cpu_adam op is not prebuilt; it compiles on first use (minutes, once)", name)
