"""Numbers the YAML derives and the modules compute alike, written once: hydra-free, so the models can
import them (the resolvers in :mod:`segldm.config.resolvers` register them for the YAML)."""

from __future__ import annotations

from collections.abc import Sequence


def downsample_factor(ch_mult: Sequence[int]) -> int:
    """Spatial downsampling image -> latent of a taming Encoder: one halving between consecutive levels."""
    return 2 ** (len(ch_mult) - 1)
