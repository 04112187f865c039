"""Lightning's checkpoint writer made atomic (``trainer.plugins``), and what makes a file resumable."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.fabric.plugins import TorchCheckpointIO

from segldm.storage.atomic import atomic_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's CheckpointIO with atomic local writes (``trainer.plugins`` in conf/trainer/default.yaml).

    Lightning's own writer builds the whole file in memory and writes it in place; a kill during the
    write truncates the file, and a full disk loses the previous checkpoint. Remote (fsspec) paths
    keep Lightning's writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_save(checkpoint, path)


def is_resumable(checkpoint: Mapping[str, Any]) -> bool:
    """A Lightning training checkpoint (optimizer and loop state), not a weights-only file."""
    return "optimizer_states" in checkpoint and "loops" in checkpoint and "global_step" in checkpoint
