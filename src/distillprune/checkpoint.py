"""Checkpoint files that a kill can never leave half-written, the ``resume`` setting, a CSV log that a
resumed run continues instead of replacing, and SLURM's pre-timeout signal turned into checkpoint + requeue."""

from __future__ import annotations

import csv
import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO

from distillprune.errors import UserError

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to ``<name>.tmp``, fsync, then rename over the target: the previous checkpoint stays loadable until
    the new one is complete. Loads with ``weights_only=True`` (tensors and plain containers, no pickled code)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def resolve_resume(resume: str | None, checkpoint_dir: Path) -> str | None:
    """``auto``: the run folder's newest checkpoint when there is one (``checkpoints/last.ckpt`` or an
    ``hpc_ckpt_N.ckpt`` written on SLURM's requeue signal); a path: that file (or, for ZeRO and FSDP, that checkpoint
    folder); None: start fresh."""
    if resume in (None, "", "never"):
        return None
    if resume == "auto":
        # the newest of the last step checkpoint and the ones SLURM's pre-timeout signal had Lightning write
        found = [
            p for p in [checkpoint_dir / "last.ckpt", *checkpoint_dir.parent.glob("hpc_ckpt_*.ckpt")] if p.exists()
        ]
        return str(max(found, key=lambda p: p.resolve().stat().st_mtime)) if found else None
    path = Path(resume)
    if not path.exists():
        raise UserError(f"resume={resume}: no such checkpoint file or folder")
    return str(path)


class ResumedCSVLogger(CSVLogger):
    """``logs/metrics.csv`` that a resumed run appends to (Lightning's logger deletes the earlier rows). Steps
    logged after the last checkpoint and before a kill appear twice; the later row is the resumed run's."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])


class RequeueOnSignal(L.Callback):
    """SIGUSR1 (what ``sbatch --signal=SIGUSR1@90`` sends before the time limit): write ``hpc_ckpt_<n>.ckpt`` and
    requeue the job, at the end of a training step that every rank reaches together.

    Lightning's own SLURM handler saves inside the signal handler, wherever each rank happens to be; under DDP one
    rank can then wait in the checkpoint's barrier while another waits in a gradient all-reduce, and the job hangs
    until its time limit. Here the handler only sets a flag; the flag is max-reduced over the ranks after every
    step, so all of them checkpoint at the same step. Then global rank 0 runs ``scontrol requeue`` and every rank
    stops; ``resume=auto`` continues from the checkpoint in the requeued job."""

    def __init__(self) -> None:
        self.signalled = False
        self.requeued = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signalled = True

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        flag = torch.tensor(float(self.signalled), device=trainer.strategy.root_device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="max")
        if flag.item() == 0:
            return
        log.info("Handling auto-requeue signal at step %d", trainer.global_step)
        trainer.save_checkpoint(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))
        if trainer.is_global_zero:
            requeue_job()
        self.requeued = True
        trainer.should_stop = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        requeue_on_signal_now()  # after fit: evaluation and export, with nothing left to checkpoint


def requeue_job() -> bool:
    """``scontrol requeue`` this SLURM job (or array task); logged either way."""
    job = os.environ["SLURM_JOB_ID"]
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if done.returncode == 0:
        log.info("Requeued SLURM job: %s", job)
    else:
        log.warning("scontrol requeue %s failed (%s)", job, done.stderr.strip())
    return done.returncode == 0


def requeue_on_signal_now() -> None:
    """Outside ``fit`` (teacher generation, calibration and pruning, the evaluation stage), SIGUSR1 requeues the
    job at once: what those stages wrote is durable (the generation store is fsynced per batch, exports are
    atomic), so the requeued attempt continues from it instead of losing the signal. Global rank 0 requeues;
    SLURM then stops every task. Inside ``fit``, ``RequeueOnSignal`` takes over (checkpoint first)."""
    if not SLURMEnvironment.detect():
        return

    def handler(signum: int, frame: Any) -> None:
        if os.environ.get("SLURM_PROCID", "0") == "0":
            log.info("requeue signal outside training: requeueing the job now")
            requeue_job()

    signal.signal(signal.SIGUSR1, handler)


def slurm_plugins() -> tuple[list[Any], list[L.Callback]]:
    """Inside a SLURM job: the SLURM environment without Lightning's requeue handler, and ``RequeueOnSignal``."""
    if not SLURMEnvironment.detect():
        return [], []
    return [SLURMEnvironment(auto_requeue=False)], [RequeueOnSignal()]
