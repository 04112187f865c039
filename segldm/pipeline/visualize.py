"""Pictures people look at: coloured masks and sample grids (mask | generated | real)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

log = logging.getLogger(__name__)
GRID_COLUMNS = 8


def save_grid(rows: Sequence[torch.Tensor], path: str | Path) -> Path:
    """Stack rows of (B, 3, H, W) images in [-1, 1] into one PNG; one row per tensor."""
    images = torch.cat([r.detach().float().cpu().clamp(-1, 1) for r in rows])
    grid = make_grid((images + 1) / 2, nrow=rows[0].shape[0], padding=2, pad_value=1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(path)
    return path


def save_grid_rows(conditions: list[torch.Tensor], samples: list[torch.Tensor], path: Path) -> Path | None:
    """Rows of up to 8: conditions, then their samples below; skipped when the sizes differ."""
    if len({tuple(t.shape) for t in conditions + samples}) != 1:
        log.info("masks have different sizes: no grid written")
        return None
    blank = torch.ones_like(samples[0])
    rows = []
    for start in range(0, len(samples), GRID_COLUMNS):
        chunk = slice(start, start + GRID_COLUMNS)
        pad = [blank] * (GRID_COLUMNS - len(samples[chunk])) if len(samples) > GRID_COLUMNS else []
        rows += [*conditions[chunk], *pad, *samples[chunk], *pad]
    grid = make_grid(
        (torch.stack(rows).clamp(-1, 1) + 1) / 2,
        nrow=min(GRID_COLUMNS, len(samples)),
        padding=2,
        pad_value=1.0,
    )
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
    return path
