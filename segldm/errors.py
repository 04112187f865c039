"""Start-up errors: what a user got wrong, said in one message without a traceback.

Every check that runs before the long work raises a :class:`StartupError` (config keys that disagree,
a checkpoint that cannot be read, a busy run folder, an unreachable tracking server, bad data files).
The entry points wrap their Hydra task in :func:`segldm.config.startup.reports_startup_errors`, which
prints such an error's message and exits with status 2. Any other exception is a bug or an
environment failure and keeps its traceback.
"""

from __future__ import annotations


class StartupError(ValueError):
    """A run that cannot start as configured; the message names the key, file or value and the way out."""


class MissingFileError(StartupError, FileNotFoundError):
    """A file the config names does not exist (a checkpoint, a dataset root, weights)."""


__all__ = ["MissingFileError", "StartupError"]
