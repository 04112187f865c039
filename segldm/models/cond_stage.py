"""CompVis ``SpatialRescaler``: the trainable conditioning stage that turns a one-hot mask into UNet input."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
