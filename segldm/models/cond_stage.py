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


def check_label_ids(ids: torch.Tensor, n_labels: int, ignore_label: int | None) -> torch.Tensor:
    """Mask of ignored pixels; raises on ids outside [0, n_labels) that are not the ignore label."""
    ignored = torch.zeros_like(ids, dtype=torch.bool) if ignore_label is None else ids == ignore_label
    bad = ((ids < 0) | (ids >= n_labels)) & ~ignored
    if bad.any():
        values = torch.unique(ids[bad]).tolist()[:10]
        raise ValueError(
            f"label_map holds ids {values} outside [0, {n_labels}) (model.cond_stage.in_channels) and not "
            f"model.ignore_label={ignore_label}; set data.n_labels / data.ignore_label to match the data"
        )
    return ignored


def one_hot_from_label_map(
    label_map: torch.Tensor, n_labels: int, ignore_label: int | None = None
) -> torch.Tensor:
    """(B, H, W) integer ids -> (B, n_labels, H, W) float32 one-hot, built where `label_map` lives.

    Equal to F.one_hot(ids, n_labels).permute(0, 3, 1, 2).float(), but scattered straight into the
    float layout (no int64 one-hot in between: 8x less memory). Pixels equal to `ignore_label` get
    an all-zero vector; any other id outside [0, n_labels) raises (never a silently wrong condition).
    """
    ids = label_map.long()
    ignored = check_label_ids(ids, n_labels, ignore_label)
    out = torch.zeros((ids.shape[0], n_labels, *ids.shape[1:]), dtype=torch.float32, device=ids.device)
    index = ids.masked_fill(ignored, 0).unsqueeze(1)
    return out.scatter_(1, index, (~ignored).unsqueeze(1).to(torch.float32))
