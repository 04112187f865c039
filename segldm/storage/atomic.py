"""The one atomic writer: files that survive kills and full disks.

Every file segldm must not leave half-written goes through :func:`atomic_save` (checkpoints, both
Lightning's through ``segldm.runtime.checkpoint_io.AtomicCheckpointIO`` and ``segldm.convert``'s;
the FID feature cache; the Inception conversion; sweep markers): the bytes go to a
temporary file beside the target, are fsync'ed, and only then renamed over it, so a kill at any moment
leaves either the previous complete file or the new complete one, never a truncated ``last.ckpt``.
A write that fails (disk full, permissions, quota) raises :class:`CheckpointWriteError` naming the
path and the cause, and the previous checkpoint stays as it was.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

TEMP_PREFIX = "."  # temporary files are hidden: `.<name>.<random>.tmp`, never matched by `*.ckpt`
TEMP_SUFFIX = ".tmp"
CAUSES: dict[int, str] = {
    errno.ENOSPC: "the disk is full: free space there or point paths.output_root at a larger disk",
    errno.EDQUOT: "the disk quota is exhausted: free space or ask for more quota",
    errno.EACCES: "permission denied: make the folder writable or choose another paths.output_root",
    errno.EPERM: "permission denied: make the folder writable or choose another paths.output_root",
    errno.EROFS: "the file system is read-only: choose another paths.output_root",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f): raise the limit",
}


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the message names the file and the way out."""


def _fsync_dir(path: Path) -> None:
    """Make a rename durable: fsync the folder entry (best effort; some file systems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def write_error(path: Path, err: OSError) -> CheckpointWriteError:
    """The error for a failed checkpoint write: path, errno text, free space, and what to do."""
    cause = CAUSES.get(err.errno or 0, "see the error above")
    free = ""
    with contextlib.suppress(OSError):
        free = f"; {shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free on that disk"
    kept = " The previous checkpoint at that path is intact." if path.exists() else ""
    return CheckpointWriteError(
        err.errno or errno.EIO,
        f"could not write checkpoint {path}: {err.strerror or err} ({cause}{free}).{kept}",
    )


def os_error_behind(err: BaseException | None) -> OSError | None:
    """The OSError that ``err`` is or that it was raised while handling (its cause/context chain)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _create_temp(path: Path) -> tuple[int, str]:
    """A new hidden file beside ``path``, created with the umask's permissions (mkstemp would make it 0600)."""
    while True:
        tmp = path.parent / f"{TEMP_PREFIX}{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), str(tmp)
        except FileExistsError:
            continue


def atomic_save(obj: Any, path: str | Path, save: Callable[[Any, Any], Any] | None = None) -> Path:
    """Write ``obj`` with ``save(obj, file)`` (default ``torch.save``) to a temp file beside ``path``, fsync, rename.

    On any failure the temporary file is removed and ``path`` keeps its previous content; OS errors
    (ENOSPC, EACCES, EROFS, EDQUOT, EFBIG, ...) become :class:`CheckpointWriteError`.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(path)
        with os.fdopen(fd, "wb") as f:
            (save or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except CheckpointWriteError:
        raise
    except Exception as err:
        os_error = os_error_behind(err)  # torch's zip writer hides the OSError behind a RuntimeError
        if os_error is None:
            raise
        raise write_error(path, os_error) from err
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def stale_temp_files(folder: str | Path) -> list[Path]:
    """Temporary files a killed writer left in ``folder`` (safe to delete: never renamed into place)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}") if ".ckpt." in p.name)


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the leftovers of writes interrupted by a kill; returns what was removed."""
    removed = []
    for path in stale_temp_files(folder):
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:  # another rank of the same job removed it first
            continue
        except OSError as err:  # never fatal: a leftover only takes space
            log.warning("could not remove stale temporary checkpoint %s: %s", path, err)
    if removed:
        log.info("removed %d temporary file(s) of interrupted checkpoint writes in %s", len(removed), folder)
    return removed
