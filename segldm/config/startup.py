"""How an entry point reports a :class:`segldm.errors.StartupError`: its message, no traceback, status 2.

``HYDRA_FULL_ERROR=1`` keeps the traceback; a multirun job raises the error to Hydra, which records
the failed job while the sweep's other jobs run. Any other exception keeps its traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from segldm.errors import StartupError

EXIT_STATUS = 2

Task = TypeVar("Task", bound=Callable[..., Any])


def full_error_requested() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def in_multirun() -> bool:
    """A job of a Hydra multirun: its failure is Hydra's to record, the sweep's other jobs must not exit."""
    if not HydraConfig.initialized():
        return False
    return HydraConfig.get().mode == RunMode.MULTIRUN


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


__all__ = ["EXIT_STATUS", "full_error_requested", "in_multirun", "reports_startup_errors"]
