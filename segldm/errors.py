"""Start-up errors: what a user got wrong, said in one message without a traceback.

Every check that runs before the long work raises a :class:`StartupError` (config keys that disagree,
a checkpoint that cannot be read, a busy run folder, an unreachable tracking server, bad data files).
The entry points wrap their Hydra task in :func:`reports_startup_errors`: such an error prints its
message and exits with status 2; ``HYDRA_FULL_ERROR=1`` keeps the traceback, and a multirun job
raises it to Hydra, which records the failed job. Any other exception is
a bug or an environment failure and keeps its traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

EXIT_STATUS = 2

Task = TypeVar("Task", bound=Callable[..., Any])


class StartupError(ValueError):
    """A run that cannot start as configured; the message names the key, file or value and the way out."""


def full_error_requested() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def in_multirun() -> bool:
    """A job of a Hydra multirun: its failure is Hydra's to record, the sweep's other jobs must not exit."""
    if not HydraConfig.initialized():
        return False
    return HydraConfig.get().mode == RunMode.MULTIRUN


class MissingFileError(StartupError, FileNotFoundError):
    """A file the config names does not exist (a checkpoint, a dataset root, weights)."""


def reports_startup_errors(task: Task) -> Task:
    """Decorate a Hydra task function: a start-up error prints ``error: <message>`` and exits 2."""

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except StartupError as err:
            if full_error_requested() or in_multirun():
                raise
            print(f"error: {err}", file=sys.stderr, flush=True)
            print("(HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_STATUS) from None

    return wrapper  # type: ignore[return-value]


__all__ = [
    "EXIT_STATUS",
    "MissingFileError",
    "StartupError",
    "full_error_requested",
    "reports_startup_errors",
]
