"""Reading and writing checkpoint files safely, below any model: kinds, strict loading, EMA split.

Checkpoints are read with ``torch.load(weights_only=True)``, which never runs code from the file;
a file that needs more (pickled Python objects) fails with a message naming it and the opt-in
(``trust_checkpoint``). safetensors files (weights only, :mod:`segldm.storage.safetensors_files`)
are read wherever a checkpoint is, into the same dict. Writes go through the one atomic writer
(:mod:`segldm.storage.atomic`).
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segldm.errors import MissingFileError, StartupError
from segldm.storage.atomic import atomic_save
from segldm.storage.safetensors_files import checkpoint_from, looks_like_safetensors, read_safetensors

EMA_PREFIX = "model_ema."
TRUST_HELP = (
    "If you trust the file (it may run code when unpickled), allow it with trust_checkpoint=True "
    "(Python), --trust-checkpoint (segldm.convert) or trust_checkpoint=true (segldm.sample / "
    "segldm.train init_from); or re-save only its tensors once: torch.save({'state_dict': "
    "torch.load(path, weights_only=False)['state_dict']}, new_path)"
)
KIND_DESCRIPTIONS: dict[str, str] = {
    "segldm-ldm": "a segldm LDM checkpoint (segldm.kind = 'ldm')",
    "segldm-autoencoder": "a segldm first-stage (VQ autoencoder) checkpoint",
    "segldm-segmenter": "a segldm segmenter checkpoint (segldm.train_segmenter, used by segldm.eval for mIoU)",
    "compvis-ldm": "a CompVis LatentDiffusion checkpoint (model.diffusion_model.* keys, no segldm config inside)",
    "vq-autoencoder": "a CompVis/taming VQ autoencoder (first-stage) checkpoint (encoder.*, decoder.*, quantize.* keys)",
    "unknown": "a state_dict segldm does not recognise (no model.diffusion_model.* and no encoder.* keys)",
}


class CheckpointError(StartupError):
    """A checkpoint file is unreadable, of the wrong kind, or does not fit the model (names file and keys)."""


class CheckpointWarning(UserWarning):
    """A checkpoint loads, but not exactly as its config asks (e.g. no EMA weights in it)."""


def list_keys(keys: Iterable[str], limit: int = 10) -> str:
    """Sorted, comma-separated, at most ``limit`` shown (error messages stay readable for 600 keys)."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys) - limit} more)" if len(keys) > limit else shown


# the first bytes of a legacy (pre-zip) torch.save file: pickle protocol 2, then torch's magic number
LEGACY_TORCH_PREFIX = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."
ZIP_PREFIX = b"PK\x03\x04"


def not_a_checkpoint_reason(path: Path) -> str | None:
    """Why ``path`` is not a torch checkpoint at all, judged from its bytes (None: it looks like one).

    torch.save writes a zip archive holding ``<name>/data.pkl`` (or, before torch 1.6, a pickle that
    starts with torch's magic number). Telling these apart first keeps the "pickled Python objects"
    advice (``trust_checkpoint``) for the one case where it is the way out.
    """
    with open(path, "rb") as f:
        head = f.read(64)
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes): an interrupted copy or save?"
    if head.startswith(ZIP_PREFIX):
        if not zipfile.is_zipfile(path):
            return (
                f"is not a readable torch checkpoint (truncated or corrupt?): it starts like torch.save's zip "
                f"format but its end is missing ({size} bytes), as after an interrupted copy, download or save; "
                "copy it again or take an older checkpoint"
            )
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if not any(name.endswith("data.pkl") for name in names):
            return f"is a zip archive but not a torch checkpoint (no data.pkl among {names[:3]}...)"
        return None
    if head.startswith(LEGACY_TORCH_PREFIX):
        return None
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        return "is a safetensors file, not a torch checkpoint: load it with safetensors.torch.load_file"
    if head[:1] == b"\x80":
        return "is a plain Python pickle, not a file written by torch.save"
    preview = head[:16]
    text = preview.decode("utf-8", "replace")
    readable = "\ufffd" not in text and all(c.isprintable() or c.isspace() for c in text)
    kind = "a text file" if readable else "binary data"
    return (
        f"is not a torch checkpoint: it is {kind} starting with {preview!r} (torch.save writes a zip archive "
        "starting with b'PK'); check the path"
    )


def read_checkpoint(
    path: str | Path,
    *,
    what: str = "checkpoint",
    trust_checkpoint: bool = False,
    missing_help: str = "",
) -> dict[str, Any]:
    """The top-level mapping of a checkpoint file, read without running pickled code by default.

    A bare state_dict (a mapping of names to tensors) is returned as ``{"state_dict": it}``; a
    safetensors file as ``{"state_dict": its tensors, **its segldm metadata}``.
    Raises ``FileNotFoundError`` for a missing file and :class:`CheckpointError` naming the file and
    ``what`` was expected when it is not a readable torch checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{what} not found: {path}. {missing_help}".rstrip())
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is not a file")
    if looks_like_safetensors(path):
        return read_safetensors_checkpoint(path, what)
    reason = not_a_checkpoint_reason(path)
    if reason:
        raise CheckpointError(f"{what} {path} {reason}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_checkpoint)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "weights only" in text.lower() or "weights_only" in text:
            detail = next((line.strip() for line in text.splitlines() if "GLOBAL" in line), "")
            raise CheckpointError(
                f"{what} {path} holds pickled Python objects besides tensors, which safe "
                f"(weights_only) loading refuses{f' ({detail})' if detail else ''}. {TRUST_HELP}"
            ) from err
        raise CheckpointError(f"{what} {path} is not a readable torch checkpoint ({err})") from err
    except Exception as err:  # the unpickler raises anything (RuntimeError, EOFError, ...) on garbage
        raise CheckpointError(
            f"{what} {path} is not a readable torch checkpoint (truncated or corrupt?): {err}"
        ) from err
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"state_dict": dict(obj)}
    if not isinstance(obj, Mapping) or not isinstance(obj.get("state_dict"), Mapping):
        raise CheckpointError(
            f"{what} {path} does not contain a state_dict (a mapping of names to tensors, or a dict "
            f"with a 'state_dict' entry); got {type(obj).__name__}"
        )
    return dict(obj)


def read_safetensors_checkpoint(path: Path, what: str) -> dict[str, Any]:
    """A safetensors file as a checkpoint dict: its tensors as ``state_dict``, the ``segldm`` section
    (kind, config) and step from its metadata (:mod:`segldm.storage.safetensors_files`)."""
    try:
        tensors, metadata = read_safetensors(path)
        checkpoint = checkpoint_from(tensors, metadata)
    except ModuleNotFoundError:
        raise
    except Exception as err:  # safetensors raises its own SafetensorError on truncated or corrupt files
        raise CheckpointError(
            f"{what} {path} is not a readable safetensors file (truncated or corrupt?): {err}"
        ) from err
    if not tensors:
        raise CheckpointError(f"{what} {path} is a safetensors file without tensors")
    return checkpoint


def state_dict_of(
    checkpoint: Mapping[str, Any], path: str | Path, what: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """``checkpoint["state_dict"]`` checked to be a non-empty mapping of names to tensors."""
    state_dict = checkpoint.get("state_dict")
    if (
        not isinstance(state_dict, Mapping)
        or not state_dict
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items())
    ):
        raise CheckpointError(f"{what} {path} does not contain a state_dict (a mapping of names to tensors)")
    return dict(state_dict)


def checkpoint_kind(checkpoint: Mapping[str, Any]) -> str:
    """One of the :data:`KIND_DESCRIPTIONS` keys, from the ``segldm`` section or else the key names."""
    section = checkpoint.get("segldm")
    if isinstance(section, Mapping):
        kind = f"segldm-{section.get('kind')}"
        return kind if kind in KIND_DESCRIPTIONS else "unknown"
    keys = list((checkpoint.get("state_dict") or {}).keys())
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "compvis-ldm"
    if any(k.startswith("vq.encoder.") for k in keys):
        return "segldm-autoencoder"
    if any(k.startswith("encoder.") for k in keys) and any(k.startswith("quantize.") for k in keys):
        return "vq-autoencoder"
    return "unknown"


def wrong_kind(path: str | Path, kind: str, expected: str, way_out: str) -> CheckpointError:
    """The error for a checkpoint of another kind than the caller needs."""
    return CheckpointError(f"{path}: expected {expected}, but this is {KIND_DESCRIPTIONS[kind]}. {way_out}")


def state_dict_problems(own: Mapping[str, torch.Tensor], loaded: Mapping[str, torch.Tensor]) -> list[str]:
    """Missing keys, unexpected keys and shape mismatches of ``loaded`` against ``own`` (empty: fits)."""
    problems = []
    missing = own.keys() - loaded.keys()
    unexpected = loaded.keys() - own.keys()
    if missing:
        problems.append(f"{len(missing)} missing key(s): {list_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {list_keys(unexpected)}")
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in sorted(loaded.items())
        if k in own and v.shape != own[k].shape
    ]
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): " + "; ".join(shapes[:10]))
    return problems


def load_strict(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], path: str | Path, what: str
) -> None:
    """``module.load_state_dict(strict=True)`` with an error naming the file and every bad key."""
    problems = state_dict_problems(module.state_dict(), state_dict)
    if problems:
        raise CheckpointError(f"{path} does not match {what}: " + " | ".join(problems))
    module.load_state_dict(state_dict, strict=True)


def split_ema(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights, ``model_ema.*`` entries) of an LDM state_dict."""
    weights = {k: v for k, v in state_dict.items() if not k.startswith(EMA_PREFIX)}
    ema = {k: v for k, v in state_dict.items() if k.startswith(EMA_PREFIX)}
    return weights, ema


def reconcile_ema(
    use_ema: bool, state_dict: Mapping[str, torch.Tensor], path: str | Path, config_key: str
) -> tuple[bool, dict[str, torch.Tensor]]:
    """Decide whether the model is built with EMA from what the checkpoint holds (CompVis semantics).

    Config use_ema and ``model_ema.*`` present: EMA on. use_ema but no shadows: EMA off with a warning
    (sampling uses the raw weights). Shadows but use_ema false: they are dropped with a warning, as
    the reference (strict=False) ignores them.
    """
    weights, ema = split_ema(state_dict)
    if use_ema and not ema:
        warnings.warn(
            f"{config_key} is true but {path} has no model_ema.* weights: building the model without EMA, "
            "so sampling uses the raw (non-averaged) UNet weights",
            CheckpointWarning,
            stacklevel=3,
        )
        return False, weights
    if not use_ema and ema:
        warnings.warn(
            f"{path} holds EMA weights (model_ema.*) but {config_key} is false: they are ignored and "
            f"sampling uses the raw weights; set {config_key}=true to sample with them",
            CheckpointWarning,
            stacklevel=3,
        )
        return False, weights
    return use_ema, dict(state_dict)


def save_checkpoint(checkpoint: Mapping[str, Any], path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename: no half-written checkpoints.

    The same writer as training's (segldm.storage.atomic.atomic_save); failures name the file and cause.
    """
    return atomic_save(dict(checkpoint), path)
