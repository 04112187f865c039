"""Progress bars that do not lie in piped logs: one place for every tqdm bar of segldm.

On a terminal, :func:`tqdm` is tqdm's own bar. When its stream is not a terminal (`make eval >
log`, a batch job's output file), tqdm would still draw with carriage returns: the file gets one
ever-growing line that editors and `tail` show as garbage. There a :class:`LineProgress` prints
a plain line (`generating: 40% 160/400 [01:02<01:33, 2.6img/s]`) when ``every_n_seconds``
have passed or the count crosses another 10 %, and a last one at the end — like training's
ProgressLog (segldm/training/callbacks.py). In an app whose logging is configured (the Hydra entry
points) the lines go through logging (terminal and `<task>.log`), else to the stream.

``SEGLDM_PROGRESS_SECONDS`` sets the interval (default 30 s).
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
from typing import Any

from tqdm.auto import tqdm as terminal_tqdm
from tqdm.std import tqdm as std_tqdm

log = logging.getLogger("segldm.progress")

DEFAULT_EVERY_N_SECONDS = 30.0
EVERY_N_PERCENT = 10


def progress_interval_s() -> float:
    """Seconds between two progress lines in a piped log (``SEGLDM_PROGRESS_SECONDS``, default 30)."""
    value = os.environ.get("SEGLDM_PROGRESS_SECONDS")
    return float(value) if value else DEFAULT_EVERY_N_SECONDS


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LineProgress(std_tqdm):
    """tqdm that prints whole lines, rate-limited, instead of redrawing one line with ``\\r``."""

    def __init__(self, *args: Any, every_n_seconds: float | None = None, **kwargs: Any) -> None:
        self.every_n_seconds = progress_interval_s() if every_n_seconds is None else every_n_seconds
        self._last_line_t = -float("inf")
        self._printed_n: int | float | None = None
        self._bucket = -1
        kwargs.update(mininterval=0.0, miniters=1)  # every update reaches display(), which decides
        super().__init__(*args, **kwargs)

    def _line(self) -> str:
        d = self.format_dict
        desc = f"{d['prefix']}: " if d.get("prefix") else ""
        rate = d["rate"] or (d["n"] / d["elapsed"] if d["elapsed"] else None)
        unit = d.get("unit") or "it"
        speed = f", {rate:.2f}{unit}/s" if rate else ""
        elapsed = self.format_interval(d["elapsed"])
        if d["total"]:
            share = 100.0 * d["n"] / d["total"]
            remaining = (d["total"] - d["n"]) / rate if rate else None
            eta = f"<{self.format_interval(remaining)}" if remaining is not None else ""
            return f"{desc}{share:3.0f}% {d['n']}/{d['total']} [{elapsed}{eta}{speed}]"
        return f"{desc}{d['n']}{unit} [{elapsed}{speed}]"

    def _emit(self) -> None:
        line = self._line()
        if logging.getLogger().handlers:  # a configured app (Hydra): terminal and the run's log file
            log.info("%s", line)
        else:
            self.fp.write(line + "\n")
            self.fp.flush()
        self._printed_n = self.n
        self._last_line_t = time.monotonic()

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:  # noqa: ARG002
        if msg == "" or self.disable:  # tqdm clearing its line: nothing to clear here
            return True
        bucket = int(100 * self.n / self.total) // EVERY_N_PERCENT if self.total else -1
        due = time.monotonic() - self._last_line_t >= self.every_n_seconds
        if self._printed_n is None or bucket != self._bucket or (due and self.n != self._printed_n):
            self._bucket = bucket
            self._emit()
        return True

    def close(self) -> None:
        if not self.disable and self.n != self._printed_n:
            self._emit()  # the last count, whatever the interval
        self.fp = io.StringIO()  # what tqdm writes while closing (its final \r or \n) goes nowhere
        super().close()


def tqdm(*args: Any, **kwargs: Any) -> Any:
    """tqdm's bar on a terminal, :class:`LineProgress` lines elsewhere (same arguments as tqdm)."""
    stream = kwargs.get("file") or sys.stderr
    if kwargs.get("disable") or is_terminal(stream):
        return terminal_tqdm(*args, **kwargs)
    return LineProgress(*args, **kwargs)


__all__ = ["LineProgress", "is_terminal", "progress_interval_s", "tqdm"]
