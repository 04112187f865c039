"""Pictures people look at: coloured masks and sample grids (mask | generated | real)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid


def label_palette(n_labels: int) -> np.ndarray:
    """A fixed, well-spread RGB colour per label (uint8, n_labels x 3), the same in every run."""
    if n_labels == 8:  # the built-in scenes: their own base colours read best
        from segldm.data.synthetic import CLASS_COLORS

        return CLASS_COLORS.astype(np.uint8)
    rng = np.random.default_rng(12345)
    return rng.integers(30, 256, size=(n_labels, 3), dtype=np.int64).astype(np.uint8)


def colorize_labels(label_map: torch.Tensor, n_labels: int) -> torch.Tensor:
    """(B, H, W) integer labels -> (B, 3, H, W) float images in [-1, 1]."""
    palette = torch.from_numpy(label_palette(n_labels)).to(label_map.device)
    rgb = palette[label_map.long().clamp(0, n_labels - 1)].permute(0, 3, 1, 2).float()
    return rgb / 127.5 - 1.0


def save_grid(rows: Sequence[torch.Tensor], path: str | Path) -> Path:
    """Stack rows of (B, 3, H, W) images in [-1, 1] into one PNG; one row per tensor."""
    images = torch.cat([r.detach().float().cpu().clamp(-1, 1) for r in rows])
    grid = make_grid((images + 1) / 2, nrow=rows[0].shape[0], padding=2, pad_value=1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(path)
    return path
