"""Checkpoint files that a kill can never leave half-written, the ``resume`` setting, and a CSV log that a
resumed run continues instead of replacing."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.plugins.io import TorchCheckpointIO

from distillprune.errors import UserError


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
