"""Which way is better for each metric key: declared by the metric classes, read by sweeps.

Every :class:`segldm.metrics.metric.Metric` subclass registers its keys' directions here when it is
defined; ``sweep.direction`` (``${segldm.objective_direction:${sweep.objective}}``) and the sweep
report look them up. Losses (a ``loss`` in the name) are minimised. Any other key is an error naming
the known ones: a direction guessed from a name would silently rank a sweep backwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra.utils import get_class

DIRECTIONS = ("maximize", "minimize")
_registered: dict[str, tuple[str, str]] = {}


def register_direction(key: str, direction: str, owner: str = "") -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"{owner}: direction of {key!r} is {direction!r}; expected one of {DIRECTIONS}")
    _registered[key] = (direction, owner)


def registered_directions() -> dict[str, str]:
    return {key: direction for key, (direction, _) in _registered.items()}


def import_metric_classes(metrics_config: Mapping[str, Any] | None) -> None:
    """Import the class of every configured metric (``_target_``): defining it registers its directions."""
    for entry in (metrics_config or {}).values():
        target = entry.get("_target_") if isinstance(entry, Mapping) else None
        if target:
            get_class(str(target))


def objective_direction(metric: str, metrics_config: Mapping[str, Any] | None = None) -> str:
    """``maximize`` or ``minimize`` for a logged metric (``val/miou``, ``eval/fid``, ``val/loss``), as
    the metric classes declare it (those of ``metrics_config`` are imported first)."""
    import_metric_classes(metrics_config)
    key = str(metric).rsplit("/", 1)[-1]
    if key in _registered:
        return _registered[key][0]
    if "loss" in key.lower():
        return "minimize"
    known = ", ".join(sorted(_registered)) or "none registered"
    raise ValueError(
        f"sweep.objective={metric}: no metric declares whether {key!r} is better high or low (metrics: "
        f"{known}; losses are minimised). Name a logged metric, or set sweep.direction=maximize|minimize"
    )


__all__ = ["objective_direction", "register_direction", "registered_directions"]
