"""Checkpoint files that a kill can never leave half-written, and the ``resume`` setting."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
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
    """``auto``: the run folder's last checkpoint when there is one; a path: that file (or, for ZeRO and FSDP,
    that checkpoint folder); None: start fresh."""
    if resume in (None, "", "never"):
        return None
    if resume == "auto":
        last = checkpoint_dir / "last.ckpt"
        return str(last) if last.exists() else None
    path = Path(resume)
    if not path.exists():
        raise UserError(f"resume={resume}: no such checkpoint file or folder")
    return str(path)
