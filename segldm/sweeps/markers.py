"""Marker files of a sweep on disk: one per finished job (``sweep_job.json``) and the sweep's manifest
(``sweep.json``), written atomically so a reader never sees half a marker."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from segldm.storage.atomic import atomic_save

MARKER_NAME = "sweep_job.json"
MANIFEST_NAME = "sweep.json"


def read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_marker(path: Path, record: dict[str, Any]) -> None:
    """Write atomically: a reader never sees half a marker, a crash never leaves one."""
    atomic_save(record, path, save=lambda obj, f: f.write(json.dumps(obj, indent=2, sort_keys=True).encode()))
