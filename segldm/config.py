"""OmegaConf resolvers for derived config values, so the YAML says `in_channels: ${segldm.add:...}`
instead of a comment. Registered when `segldm` is imported."""

from __future__ import annotations

import os
from collections.abc import Sequence

from omegaconf import OmegaConf


def downsample_factor(ch_mult: Sequence[int]) -> int:
    """Spatial downsampling of a taming Encoder: one halving between consecutive levels."""
    return 2 ** (len(ch_mult) - 1)


def register_resolvers() -> None:
    resolvers = {
        "segldm.add": lambda *xs: sum(xs),
        "segldm.mul": lambda a, b: a * b,
        "segldm.floordiv": lambda a, b: a // b,
        "segldm.downsample": downsample_factor,
        "segldm.cwd": os.getcwd,
    }
    for name, fn in resolvers.items():
        OmegaConf.register_new_resolver(name, fn, replace=True)
