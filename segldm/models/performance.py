"""Speed and memory paths of a training step that compute the reference's function with less work.

Each is switched by a `model.*` key (conf/model/ldm_seg.yaml) and checked against the reference
path in tests/unit/test_perf_equivalence.py; `python -m segldm.benchmarks` measures what each buys.

* :func:`label_map_conditioning`: label map -> SpatialRescaler output without the one-hot. For the
  seed (182 labels, 256 px) the one-hot is 45.5 MiB per image and two bilinear passes read it; a
  bilinear (or area) x0.5 stage on a one-hot is an exact 2x2 average, so n stages are the label
  histogram of each 2^n x 2^n cell divided by 4^n, which one scatter-add builds bit-exactly.
* :func:`to_channels_last` / :func:`compile_module`: memory format and torch.compile of a module
  in place (state_dict keys unchanged, so checkpoints stay CompVis-compatible).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from segldm.models.cond_stage import SpatialRescaler, check_label_ids, one_hot_from_label_map

FUSABLE_METHODS = ("bilinear", "area")  # modes where a x0.5 stage is exactly a 2x2 mean


def fused_cell_size(cond_stage: nn.Module, height: int, width: int) -> int | None:
    """Cell edge (2^n_stages) when `cond_stage` on a one-hot equals a label histogram, else None."""
    if not isinstance(cond_stage, SpatialRescaler):
        return None
    if cond_stage.method not in FUSABLE_METHODS or cond_stage.multiplier != 0.5:
        return None
    cell = 2**cond_stage.n_stages
    if height % cell or width % cell:
        return None  # odd sizes: the interpolation drops edge rows; leave them to the reference path
    return cell


def label_histograms(
    label_map: torch.Tensor, n_labels: int, cell: int, ignore_label: int | None = None
) -> torch.Tensor:
    """(B, H, W) ids -> (B, n_labels, H/cell, W/cell): share of each label in each cell x cell block.

    Equal, bit for bit, to `cell` = 2^n halvings (bilinear or area, x0.5) of the float32 one-hot:
    every partial sum is a multiple of 1/cell^2 <= 1, so the order of additions cannot round.
    Ignored pixels count for nothing (their one-hot vector is all zero).
    """
    ids = label_map.long()
    batch, height, width = ids.shape
    ignored = check_label_ids(ids, n_labels, ignore_label)
    rows, cols = height // cell, width // cell
    cell_index = (
        torch.arange(height, device=ids.device)[:, None] // cell * cols
        + torch.arange(width, device=ids.device)[None, :] // cell
    )
    index = ids.masked_fill(ignored, 0) * (rows * cols) + cell_index
    weight = (~ignored).to(torch.float32) / float(cell * cell)
    out = torch.zeros((batch, n_labels * rows * cols), dtype=torch.float32, device=ids.device)
    out.scatter_add_(1, index.reshape(batch, -1), weight.reshape(batch, -1))
    return out.reshape(batch, n_labels, rows, cols)


def label_map_conditioning(
    cond_stage: nn.Module, label_map: torch.Tensor, n_labels: int, ignore_label: int | None = None
) -> torch.Tensor:
    """`cond_stage.encode(one_hot(label_map))` without materialising the full-resolution one-hot
    when the cond stage allows it (:func:`fused_cell_size`); otherwise exactly that."""
    cell = fused_cell_size(cond_stage, label_map.shape[-2], label_map.shape[-1])
    if cell is None:
        return cond_stage.encode(one_hot_from_label_map(label_map, n_labels, ignore_label))
    x = label_histograms(label_map, n_labels, cell, ignore_label)
    return cond_stage.channel_mapper(x) if cond_stage.remap_output else x


def to_channels_last(module: nn.Module) -> nn.Module:
    """Convert 4-D parameters and buffers to channels_last in place (Parameter objects kept)."""
    return module.to(memory_format=torch.channels_last)


def compile_options(setting: bool | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """`model.performance.compile*` as torch.compile's keyword arguments: None (off), {} (true) or the dict."""
    if not setting:
        return None
    return dict(setting) if isinstance(setting, Mapping) else {}


def compile_module(module: nn.Module, options: dict[str, Any] | None = None) -> nn.Module:
    """`module.compile(**options)` in place: forward goes through torch.compile, keys unchanged."""
    module.compile(**(options or {}))
    return module
