"""One owner per run folder: a second training into a folder a live run holds is refused at start-up.

The lock is an ``fcntl.flock`` on ``<run folder>/.segldm.lock``, held for the life of the training
process: the kernel drops it when the process dies, SIGKILL included, so a killed run never leaves
it stuck and ``resume=auto`` takes the folder over. The file also names its holder (pid, host,
start time, command line), which is what the refusal shows and what a take-over reports.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from segldm.errors import StartupError

log = logging.getLogger(__name__)

LOCK_FILE = ".segldm.lock"


class RunFolderBusy(StartupError):
    """Another live process trains into this run folder."""


def holder_record() -> dict[str, Any]:
    """Who this process is, for the lock file and for the other run's refusal message."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
    }


def describe(record: dict[str, Any]) -> str:
    if not record:
        return "an unknown process (its lock file is empty)"
    return (
        f"pid {record.get('pid')} on {record.get('host')}, started {record.get('started')}: "
        f"{record.get('command') or '(command unknown)'}"
    )


def _read_record(handle: Any) -> dict[str, Any]:
    handle.seek(0)
    try:
        record = json.loads(handle.read() or "{}")
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def is_main_process() -> bool:
    """Rank 0 of a multi-process launch (or a plain run): only it owns the folder."""
    return all(int(os.environ.get(name, "0") or 0) == 0 for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


@contextlib.contextmanager
def run_folder_lock(folder: str | Path) -> Iterator[dict[str, Any] | None]:
    """Hold ``folder``'s lock while the block runs; yields the previous holder when it was taken over.

    Refuses (:class:`RunFolderBusy`, both runs named) when a live process holds it. The lock of a
    dead process (SIGKILL, power loss) is free to the kernel; its record is reported as taken over.
    Ranks other than 0 of a multi-process launch share rank 0's folder and take no lock.
    """
    if not is_main_process():
        yield None
        return
    path = Path(folder) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 (held open for the whole block)
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = _read_record(handle)
            raise RunFolderBusy(
                f"run folder {folder} is in use by another training ({describe(other)}); this run "
                f"({describe(holder_record())}) would write over its checkpoints. Wait for it to end, stop it, "
                "or train into another folder: a new timestamped one (drop hydra.run.dir / resume=auto), "
                "run_name=<other name>, or hydra.run.dir=<dir>"
            ) from None
        except OSError as err:  # a file system without flock (some NFS/Lustre mounts): train unguarded
            log.warning(
                "run folder %s cannot be locked (%s): a second training into it would not be refused",
                folder,
                err,
            )
            yield None
            return
        previous = _read_record(handle)
        if previous and previous.get("pid") != os.getpid():
            log.warning(
                "run folder %s: took over the lock of a run that is no longer alive (%s)",
                folder,
                describe(previous),
            )
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(holder_record()))
        handle.flush()
        try:
            yield previous or None
        finally:
            handle.seek(0)
            handle.truncate()  # an ended run leaves no holder behind
            handle.flush()
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    finally:
        handle.close()


__all__ = ["LOCK_FILE", "RunFolderBusy", "describe", "holder_record", "is_main_process", "run_folder_lock"]
