"""The condition: what a segmentation mask means to the model, in one object.

A mask reaches the model as an integer label map (B, H, W) of the dataset's model ids (what the
loaders ship), optionally with an instance-id map (B, H, W) beside it. :class:`LabelCondition`
owns every decision about it that used to be re-made by dtype in each caller:

* reading it from a batch (``label_map``, or the reference loaders' one-hot ``segmentation``, and
  ``instance_map``) or from label and instance files;
* its channels: one per label (``n_labels``; ``ignore_label`` pixels get an all-zero vector), plus
  one instance-edge channel with ``instance_edges`` (SPADE / OASIS / SDM on Cityscapes and
  COCO-Stuff: a pixel is an edge where its instance id differs from a 4-neighbour's);
* turning it into the cond stage's output: the fused label-histogram path when there is nothing
  but labels, else the dense map (one-hot + edges) through the cond stage. For the seed (182
  labels, 256 px) the one-hot is 45.5 MiB per image and two bilinear passes read it; a bilinear
  (or area) x0.5 stage on a one-hot is an exact 2x2 average, so n stages are the label histogram of
  each 2^n x 2^n cell divided by 4^n, which one scatter-add builds bit-exactly;
* the null condition classifier-free guidance compares with (zeros: what condition dropout trains);
* colouring it for grids and reports; checking label ranges and its own config.

Adding a condition channel means changing this object and the configs that build it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from segldm.data.synthetic import CLASS_COLORS
from segldm.data.transforms import load_mask, out_of_range
from segldm.errors import StartupError
from segldm.models.cond_stage import SpatialRescaler

LABELS_KEY = "label_map"
ONE_HOT_KEY = "segmentation"
INSTANCES_KEY = "instance_map"


# ------------------------------------------------------------------------------------ one-hot and the fused path
def check_label_ids(ids: torch.Tensor, n_labels: int, ignore_label: int | None) -> torch.Tensor:
    """Mask of ignored pixels; raises on ids outside [0, n_labels) that are not the ignore label."""
    ignored = torch.zeros_like(ids, dtype=torch.bool) if ignore_label is None else ids == ignore_label
    bad = ((ids < 0) | (ids >= n_labels)) & ~ignored
    if bad.any():
        values = torch.unique(ids[bad]).tolist()[:10]
        raise ValueError(
            f"label_map holds ids {values} outside [0, {n_labels}) (model.cond_stage.in_channels) and not "
            f"model.condition.ignore_label={ignore_label}; set data.n_labels / data.ignore_label to match the data"
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


def instance_edges(instances: torch.Tensor) -> torch.Tensor:
    """(B, H, W) instance ids -> (B, H, W) float32 edge map: 1 where a 4-neighbour has another id.

    Both pixels on either side of a boundary are edges (SPADE's ``get_edges``).
    """
    ids = instances
    edges = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    horizontal = ids[..., :, 1:] != ids[..., :, :-1]
    vertical = ids[..., 1:, :] != ids[..., :-1, :]
    edges[..., :, 1:] |= horizontal
    edges[..., :, :-1] |= horizontal
    edges[..., 1:, :] |= vertical
    edges[..., :-1, :] |= vertical
    return edges.to(torch.float32)


def label_palette(n_labels: int) -> np.ndarray:
    """A fixed, well-spread RGB colour per label (uint8, n_labels x 3), the same in every run."""
    if n_labels == len(CLASS_COLORS):  # the built-in scenes: their own base colours read best
        return CLASS_COLORS.astype(np.uint8)
    rng = np.random.default_rng(12345)
    return rng.integers(30, 256, size=(n_labels, 3), dtype=np.int64).astype(np.uint8)


def colorize_labels(label_map: torch.Tensor, n_labels: int) -> torch.Tensor:
    """(B, H, W) integer labels -> (B, 3, H, W) float images in [-1, 1] (ids outside the range clamped)."""
    palette = torch.from_numpy(label_palette(n_labels)).to(label_map.device)
    rgb = palette[label_map.long().clamp(0, n_labels - 1)].permute(0, 3, 1, 2).float()
    return rgb / 127.5 - 1.0


class ConditionError(StartupError):
    """A mask the condition cannot take (labels out of range, a missing instance map); names the source."""


@dataclass(frozen=True)
class LabelCondition:
    """A label map (plus, with ``instance_edges``, an instance map) as model input channels."""

    n_labels: int
    ignore_label: int | None = None
    instance_edges: bool = False

    def __post_init__(self) -> None:
        if int(self.n_labels) <= 0:
            raise ValueError(f"model.condition.n_labels={self.n_labels} must be positive (data.n_labels)")

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> LabelCondition:
        """The condition a data config describes (``data.n_labels``, ``ignore_label``, ``instance_edges``)."""
        return cls(int(data["n_labels"]), data.get("ignore_label"), bool(data.get("instance_edges") or False))

    # ------------------------------------------------------------------ shape
    @property
    def channels(self) -> int:
        """Input channels of the cond stage: one per label, plus the instance-edge channel."""
        return int(self.n_labels) + int(self.instance_edges)

    def config_problems(self, cond_stage_in_channels: int) -> list[str]:
        """Start-up check: the cond stage reads exactly this condition's channels."""
        if int(cond_stage_in_channels) == self.channels:
            return []
        edges = " + 1 instance-edge channel (data.instance_edges=true)" if self.instance_edges else ""
        return [
            f"model.cond_stage.in_channels={cond_stage_in_channels} but the condition has {self.channels} channels "
            f"(data.n_labels={self.n_labels}{edges}); leave model.cond_stage.in_channels to its interpolation "
            "or set the two to agree"
        ]

    # ------------------------------------------------------------------ reading
    def labels_of(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The batch's (B, H, W) label ids: ``label_map``, else the argmax of a one-hot ``segmentation``."""
        if LABELS_KEY in batch:
            return torch.as_tensor(batch[LABELS_KEY]).long()
        if ONE_HOT_KEY in batch:
            one_hot = torch.as_tensor(batch[ONE_HOT_KEY])
            return one_hot.argmax(-1).long()  # (B, H, W, C) as the reference loaders ship it
        raise KeyError(f"a batch holds its mask as '{LABELS_KEY}' or '{ONE_HOT_KEY}'; it has {sorted(batch)}")

    def instances_of(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """The batch's (B, H, W) instance ids, required when this condition has the edge channel."""
        if not self.instance_edges:
            return None
        if INSTANCES_KEY not in batch:
            raise ConditionError(
                f"data.instance_edges=true but the batch has no '{INSTANCES_KEY}' (keys {sorted(batch)}): the "
                "dataset must ship instance maps (data=cityscapes / cocostuff with instances), or set "
                "data.instance_edges=false"
            )
        return torch.as_tensor(batch[INSTANCES_KEY]).long()

    def model_input(self, batch: Mapping[str, Any], fused: bool = True) -> torch.Tensor:
        """What :meth:`encode` takes for a batch: the integer label map (fused path) when the condition
        is labels only and ``fused``, else the dense float map (B, C, H, W)."""
        if fused and not self.instance_edges and LABELS_KEY in batch:
            return torch.as_tensor(batch[LABELS_KEY])
        if ONE_HOT_KEY in batch and not self.instance_edges:
            one_hot = torch.as_tensor(batch[ONE_HOT_KEY])
            return one_hot.permute(0, 3, 1, 2).contiguous().float() if one_hot.ndim == 4 else one_hot.float()
        return self.dense(self.labels_of(batch), self.instances_of(batch))

    def read_files(
        self, labels_path: str | Path, instances_path: str | Path | None = None
    ) -> dict[str, np.ndarray]:
        """One mask from files (a label-id PNG and, with edges, its instance-id PNG), checked."""
        labels = np.asarray(load_mask(Path(labels_path))).astype(np.int64)
        sample = {LABELS_KEY: labels}
        self.check_labels(labels, str(labels_path))
        if self.instance_edges:
            if instances_path is None or not Path(instances_path).is_file():
                raise ConditionError(
                    f"{labels_path}: the model conditions on instance edges (data.instance_edges=true) and no "
                    f"instance map was found{f' at {instances_path}' if instances_path else ''}; pass "
                    "instances=<folder of instance-id PNGs named like the masks>"
                )
            instances = np.asarray(load_mask(Path(instances_path))).astype(np.int64)
            if instances.shape != labels.shape:
                raise ConditionError(
                    f"{instances_path}: instance map {instances.shape[::-1]} and label map {labels.shape[::-1]} "
                    f"({labels_path}) differ in size"
                )
            sample[INSTANCES_KEY] = instances
        return sample

    def check_labels(self, labels: np.ndarray | torch.Tensor, source: str) -> None:
        """Every id in [0, n_labels) or the ignore label, else name the source and the ids."""
        array = labels.cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
        bad = out_of_range(array, int(self.n_labels), self.ignore_label)
        if bad.size:
            raise ConditionError(
                f"{source}: label(s) {bad.tolist()[:10]} >= n_labels={self.n_labels} of the model (labels must be "
                f"in [0, {self.n_labels})"
                + (f" or the ignore label {self.ignore_label})" if self.ignore_label is not None else ")")
            )

    # ------------------------------------------------------------------ channels
    def one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, H, W) ids -> (B, n_labels, H, W) float32 one-hot (ignore pixels all zero; other ids raise)."""
        return one_hot_from_label_map(labels, int(self.n_labels), self.ignore_label)

    def dense(self, labels: torch.Tensor, instances: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H, W) ids (and instance ids) -> the (B, channels, H, W) float map the cond stage reads."""
        one_hot = self.one_hot(labels)
        if not self.instance_edges:
            return one_hot
        if instances is None:
            raise ConditionError("data.instance_edges=true: the dense condition needs the instance map")
        return torch.cat([one_hot, instance_edges(instances.to(labels.device))[:, None]], dim=1)

    def sample_input(self, sample: Mapping[str, Any]) -> torch.Tensor:
        """One mask (H, W label map, with its instance map) -> the (H, W) or (C, H, W) input :meth:`encode` takes."""
        batch = {
            k: torch.as_tensor(np.asarray(v))[None]
            for k, v in sample.items()
            if k in (LABELS_KEY, INSTANCES_KEY)
        }
        return self.model_input(batch)[0]

    def encode(self, cond_stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The cond stage's output for ``x`` from :meth:`model_input`: an integer label map takes the fused
        path (no one-hot built), a float map (B, channels, H, W) goes through the cond stage as it is."""
        if not torch.is_floating_point(x):
            if self.instance_edges:
                raise ConditionError("data.instance_edges=true: a bare label map lacks the edge channel")
            return label_map_conditioning(cond_stage, x, int(self.n_labels), self.ignore_label)
        if x.shape[1] != self.channels:
            raise ConditionError(
                f"a dense condition has {x.shape[1]} channels, this model's has {self.channels} "
                f"(n_labels={self.n_labels}, instance_edges={self.instance_edges})"
            )
        return cond_stage.encode(x)

    def null(self, encoded: torch.Tensor) -> torch.Tensor:
        """The unconditional input guidance compares with: what condition dropout trained on (zeros)."""
        return torch.zeros_like(encoded)

    # ------------------------------------------------------------------ pictures
    def colorize(self, labels: torch.Tensor, instances: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H, W) ids -> (B, 3, H, W) in [-1, 1]: a fixed colour per label, ignore pixels black,
        instance edges (with ``instance_edges``) drawn white."""
        ids = labels.long()
        ignored = (
            ids == self.ignore_label
            if self.ignore_label is not None
            else torch.zeros_like(ids, dtype=torch.bool)
        )
        rgb = colorize_labels(ids.masked_fill(ignored, 0), int(self.n_labels))
        rgb = rgb.masked_fill(ignored[:, None], -1.0)
        if self.instance_edges and instances is not None:
            rgb = rgb.masked_fill(instance_edges(instances.to(ids.device))[:, None].bool(), 1.0)
        return rgb


def as_condition(
    value: LabelCondition | Mapping[str, Any] | None, fallback: LabelCondition
) -> LabelCondition:
    """``model.condition`` as given (an object, a mapping of its fields, or None: ``fallback``)."""
    if value is None:
        return fallback
    if isinstance(value, LabelCondition):
        return value
    fields = {k: v for k, v in dict(value).items() if k != "_target_"}
    return LabelCondition(**fields)


__all__ = [
    "check_label_ids",
    "fused_cell_size",
    "label_histograms",
    "label_map_conditioning",
    "one_hot_from_label_map",
    "INSTANCES_KEY",
    "LABELS_KEY",
    "ONE_HOT_KEY",
    "ConditionError",
    "LabelCondition",
    "as_condition",
    "colorize_labels",
    "instance_edges",
    "label_palette",
]
