"""Published results of semantic image synthesis, each with its source and the protocol it was made
under (``published_results.yaml`` beside this module; ``docs/benchmarks.md`` is written from it by
``experiments/benchmarks/write_table.py``). The eval report places a comparable number beside the
rows of its own protocol and dataset, never beside another protocol's."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml

PUBLISHED_FILE = Path(__file__).with_name("published_results.yaml")
REQUIRED = ("method", "dataset", "protocol", "source")


@cache
def all_rows() -> tuple[dict[str, Any], ...]:
    """Every published row; a row without its method, dataset, protocol or source is an error."""
    if not PUBLISHED_FILE.is_file():
        return ()
    rows = yaml.safe_load(PUBLISHED_FILE.read_text()) or []
    if isinstance(rows, dict):
        rows = rows.get("rows") or []
    for i, row in enumerate(rows):
        missing = [k for k in REQUIRED if not row.get(k)]
        if missing:
            raise ValueError(f"{PUBLISHED_FILE}: row {i} ({row.get('method')}) lacks {missing}")
    return tuple(dict(r) for r in rows)


def published_rows(protocol: str, dataset: str) -> list[dict[str, Any]]:
    """The rows measured under ``protocol`` on ``dataset``."""
    return [r for r in all_rows() if r["protocol"] == protocol and r["dataset"] == dataset]


__all__ = ["PUBLISHED_FILE", "all_rows", "published_rows"]
