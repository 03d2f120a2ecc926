"""Several ranks from the first second, not from ``fit`` on: the work before training is shared or done once.

Lightning starts the other ranks of a one-command run (``trainer.devices=N``) when ``fit`` begins, so they would
redo everything before it (load, generate, prune) while rank 0 waits for them in the rendezvous. ``start`` starts
them at once instead, the way Lightning would (the same command with ``LOCAL_RANK`` set; Lightning then sees the
ranks as created outside it), and opens the process group, with a timeout long enough for rank 0's measurements.
Under srun and torchrun every rank is already running: ``start`` only opens the group. Then:

- teacher generation is split over the ranks (``shard``), each writing its own store file, behind a barrier;
- pruning is done by rank 0 alone, the others wait at a barrier and load its exported model (``barrier``).
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from typing import Any

import torch
from omegaconf import DictConfig

from distillprune.errors import UserError
from distillprune.hardware import check_devices, uses_cuda

log = logging.getLogger(__name__)
TIMEOUT = timedelta(hours=4)  # a rank waits this long for another's work before training (generation, pruning)


def start(cfg: DictConfig) -> None:
    """With more than one rank: make sure every rank runs and the process group is open (a no-op otherwise)."""
    trainer = cfg.get("trainer")
    if trainer is None or not torch.distributed.is_available() or torch.distributed.is_initialized():
        return
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    if not isinstance(devices, int) or devices * nodes <= 1:
        return
    env = _environment()
    cuda = uses_cuda(str(trainer.get("accelerator", "auto")))
    if env is None:  # one command on one machine: start the other local ranks now, as Lightning would at fit
        check_devices(str(trainer.get("accelerator", "auto")), devices)
        if nodes > 1:
            raise UserError("trainer.num_nodes > 1 needs a launcher that starts every node (srun or torchrun)")
        _spawn(devices)
        from lightning.fabric.plugins.environments import LightningEnvironment

        env = LightningEnvironment()
        env.set_world_size(devices)
        env.set_global_rank(int(os.environ["LOCAL_RANK"]))
    if cuda:
        torch.cuda.set_device(env.local_rank())
    from lightning.fabric.utilities.distributed import _init_dist_connection

    _init_dist_connection(env, "nccl" if cuda else "gloo", env.global_rank(), env.world_size(), timeout=TIMEOUT)


def rank_and_world() -> tuple[int, int]:
    """This process's global rank and the number of ranks (0 and 1 without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier(what: str) -> None:
    """Wait until every rank got here (logged, since a rank can wait long for another's work)."""
    rank, world = rank_and_world()
    if world == 1:
        return
    log.info("rank %d waiting for every rank: %s", rank, what)
    torch.distributed.barrier()


def shard(items: list[Any]) -> list[Any]:
    """This rank's share of ``items`` (every world-th, from its rank on)."""
    rank, world = rank_and_world()
    return items[rank::world]


def _environment() -> Any:
    """The cluster environment that started this process as one of several ranks, if one did."""
    from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        return TorchElasticEnvironment()
    if SLURMEnvironment.detect():
        return SLURMEnvironment(auto_requeue=False)
    if "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ:  # a rank that ``_spawn`` (or Lightning) started
        env = LightningEnvironment()
        env.set_world_size(int(os.environ["WORLD_SIZE"]))
        env.set_global_rank(int(os.environ.get("NODE_RANK", "0")) * int(os.environ["WORLD_SIZE"]) + env.local_rank())
        return env
    return None


def _spawn(devices: int) -> None:
    """Start local ranks 1..devices-1 with this process's command line; stop them all if one of them fails."""
    from lightning.fabric.plugins.environments import LightningEnvironment

    env = LightningEnvironment()
    os.environ.update(MASTER_ADDR=env.main_address, MASTER_PORT=str(env.main_port), NODE_RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE=str(devices))  # fmt: skip
    command = [sys.executable, os.path.abspath(sys.argv[0]), *sys.argv[1:]]
    children = [subprocess.Popen(command, env={**os.environ, "LOCAL_RANK": str(r)}) for r in range(1, devices)]
    log.info("started %d more local rank(s): %s", len(children), " ".join(command))

    def watch() -> None:
        while True:
            for child in children:
                code = child.poll()
                if code not in (None, 0):
                    log.error("rank %s exited with code %d; stopping the others", children.index(child) + 1, code)
                    for other in children:
                        other.kill()
                    os._exit(code)
            if all(child.poll() is not None for child in children):
                return
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True).start()
    atexit.register(lambda: [child.wait() for child in children])
