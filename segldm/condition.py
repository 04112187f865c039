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
  but labels (no full-resolution one-hot is built, bit-exact for the SpatialRescaler), else the
  dense map (one-hot + edges) through the cond stage;
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
from segldm.models.cond_stage import one_hot_from_label_map
from segldm.models.performance import label_map_conditioning

LABELS_KEY = "label_map"
ONE_HOT_KEY = "segmentation"
INSTANCES_KEY = "instance_map"


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

    def colorize_input(self, x: torch.Tensor) -> torch.Tensor:
        """A :meth:`model_input` tensor (label map or dense map) as (B, 3, H, W) colours."""
        if not torch.is_floating_point(x):
            return self.colorize(x)
        labels = x[:, : int(self.n_labels)].argmax(1)
        rgb = self.colorize(labels)
        if self.instance_edges:
            rgb = rgb.masked_fill(x[:, int(self.n_labels) :].bool(), 1.0)
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
