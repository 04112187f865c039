"""CompVis ``SpatialRescaler``: the trainable conditioning stage that turns a one-hot mask into UNet input."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segldm.config.construction import constructor_arguments, constructor_problems

INTERPOLATION_MODES: tuple[str, ...] = ("nearest", "linear", "bilinear", "trilinear", "bicubic", "area")


class SpatialRescaler(nn.Module):
    """``n_stages`` x ``F.interpolate(scale_factor=multiplier)``, then an optional 1x1 ``channel_mapper``.

    Bilinear x0.5 (align_corners=False, no antialias) equals a 2x2 average per stage, so the seed's
    2 stages map a 256 px one-hot map onto the 64 px f4 latent grid; the bias-free 1x1 conv compresses
    the 182 classes to 3 channels. Output size is ``floor(H * multiplier)`` per stage.
    """

    def __init__(
        self,
        n_stages: int = 1,
        method: str = "bilinear",
        multiplier: float = 0.5,
        in_channels: int = 3,
        out_channels: int | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if n_stages < 0:
            raise ValueError(f"SpatialRescaler: n_stages must be >= 0, got {n_stages}")
        if method not in INTERPOLATION_MODES:
            raise ValueError(f"SpatialRescaler: method must be one of {INTERPOLATION_MODES}, got {method!r}")
        if multiplier <= 0:
            raise ValueError(f"SpatialRescaler: multiplier must be > 0, got {multiplier}")
        self.n_stages = n_stages
        self.method = method
        self.multiplier = multiplier
        self.in_channels = in_channels
        self.remap_output = out_channels is not None
        self.out_channels = in_channels if out_channels is None else out_channels
        if out_channels is not None:
            self.channel_mapper = nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    @property
    def downsample_factor(self) -> int:
        """Total spatial reduction (4 for two x0.5 stages); must match the first stage's factor."""
        return round(1 / self.multiplier**self.n_stages)

    @classmethod
    def startup_problems(cls, config: Mapping[str, Any], key: str) -> list[str]:
        """The constructor's own checks, run on the meta device before anything is built."""
        return constructor_problems(cls, config, key)

    @classmethod
    def config_channels(cls, config: Mapping[str, Any], key: str) -> tuple[int, int]:
        """(channels it reads, channels it gives the UNet) for this config: ``out_channels``, or
        ``in_channels`` without a channel mapper."""
        arguments = constructor_arguments(cls, config)
        given = arguments["out_channels"]
        return int(arguments["in_channels"]), int(arguments["in_channels"] if given is None else given)

    @classmethod
    def output_side_problems(
        cls, config: Mapping[str, Any], key: str, side: int, target: int, target_why: str
    ) -> list[str]:
        """Whether this config maps ``side`` px masks to ``target`` px (``target_why``: where that comes
        from), each stage flooring as ``F.interpolate`` does."""
        arguments = constructor_arguments(cls, config)
        stages, multiplier = int(arguments["n_stages"]), float(arguments["multiplier"])
        out = int(side)
        for _ in range(stages):
            out = int(out * multiplier)
        if out == target:
            return []
        halvings = (max(side // max(target, 1), 1)).bit_length() - 1
        return [
            f"{key} maps {side}px masks to {out}px (n_stages={stages}, multiplier={multiplier}) but {target_why}; "
            f"for multiplier 0.5 use {key}.n_stages={halvings}"
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.n_stages):
            # align_corners left at the default: F.interpolate rejects it for nearest/area.
            x = F.interpolate(x, scale_factor=self.multiplier, mode=self.method)
        if self.remap_output:
            x = self.channel_mapper(x)
        return x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Same as ``forward``; LatentDiffusion.get_learned_conditioning calls ``encode``."""
        return self(x)
