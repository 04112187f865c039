"""Weights-only files in the safetensors format, the way the ecosystem shares weights.

A safetensors file holds named tensors and a header of string metadata; it runs no code when read,
and loads with ``safetensors.torch.load_file`` anywhere. segldm writes a checkpoint's state_dict as
the tensors and what the model is (the ``segldm`` section: kind + the resolved run config) as JSON
in the metadata, so ``init_from``, ``model.first_stage.ckpt_path``, ``segldm.sample ckpt=`` and
``segldm.eval ckpt=`` rebuild the model from the file alone. Optimizer and loop state are not
kept: training checkpoints (resume) stay Lightning ``.ckpt`` files.

:func:`segldm.storage.checkpoint_files.read_checkpoint` reads these files (recognised by their
header, whatever their suffix) into the same dict a ``.ckpt`` gives.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from segldm.storage.atomic import atomic_save

SUFFIX = ".safetensors"
# top-level checkpoint entries kept in the metadata (JSON); everything else is training state
METADATA_ENTRIES = ("segldm", "global_step", "epoch", "compvis")
INSTALL_HELP = "safetensors is not installed: pip install safetensors (a segldm dependency)"
HEADER_LIMIT = 100 * 2**20  # safetensors' own cap on the JSON header


def _safetensors_torch() -> Any:
    try:
        import safetensors.torch
    except ModuleNotFoundError as err:  # pragma: no cover - a declared dependency
        raise ModuleNotFoundError(INSTALL_HELP) from err
    return safetensors.torch


def looks_like_safetensors(path: str | Path) -> bool:
    """Whether the file starts like safetensors: an 8-byte little-endian header length, then ``{``."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") <= HEADER_LIMIT  # a truncated file still looks like one


def metadata_of(checkpoint: Mapping[str, Any]) -> dict[str, str]:
    """The string metadata that carries a checkpoint's non-tensor entries (:data:`METADATA_ENTRIES`)."""
    metadata = {"format": "pt"}  # what transformers/diffusers write: torch tensors
    for key in METADATA_ENTRIES:
        if checkpoint.get(key) is not None:
            try:
                metadata[key] = json.dumps(checkpoint[key], sort_keys=True)
            except TypeError as err:
                raise ValueError(
                    f"the checkpoint's {key!r} entry cannot be stored as JSON in safetensors metadata ({err}); "
                    "it must hold only plain values (a resolved config)"
                ) from err
    return metadata


def checkpoint_from(tensors: dict[str, torch.Tensor], metadata: Mapping[str, str] | None) -> dict[str, Any]:
    """The checkpoint dict (``state_dict`` plus the JSON entries) a file's tensors and metadata stand for."""
    checkpoint: dict[str, Any] = {"state_dict": tensors}
    for key in METADATA_ENTRIES:
        if metadata and key in metadata:
            checkpoint[key] = json.loads(metadata[key])
    return checkpoint


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on the CPU, metadata) of a safetensors file; errors as safetensors raises them."""
    _safetensors_torch()
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = dict(f.metadata() or {})
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    return tensors, metadata


def _unshared(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each with storage of its own (safetensors refuses shared memory)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        tensor = value.detach().to("cpu").contiguous()
        ptr = tensor.untyped_storage().data_ptr() if tensor.numel() else -1
        if ptr in seen:
            tensor = tensor.clone()
        elif ptr != -1:
            seen.add(ptr)
        out[key] = tensor
    return out


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> Path:
    """Tensors + string metadata to ``path`` through the atomic writer (never a half-written file)."""
    st = _safetensors_torch()
    tensors = _unshared(state_dict)
    meta = dict(metadata or {})

    def write(_: Any, f: Any) -> None:
        f.write(st.save(tensors, metadata=meta))

    return atomic_save(None, path, save=write)


def save_safetensors_checkpoint(checkpoint: Mapping[str, Any], path: str | Path) -> Path:
    """A checkpoint dict as a weights-only safetensors file: its state_dict + :func:`metadata_of`."""
    state_dict = checkpoint.get("state_dict")
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise ValueError("a checkpoint needs a non-empty state_dict to be written as safetensors")
    return save_safetensors(state_dict, path, metadata_of(checkpoint))


__all__ = [
    "METADATA_ENTRIES",
    "SUFFIX",
    "checkpoint_from",
    "looks_like_safetensors",
    "metadata_of",
    "read_safetensors",
    "save_safetensors",
    "save_safetensors_checkpoint",
]
