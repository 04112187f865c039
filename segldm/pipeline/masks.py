"""Masks as users have them: label-map PNG folders (with instance-map folders for models that condition
on instance edges) or a checkpoint's own data split, checked before any sampling (labels in range,
sizes the first stage and UNet can take). What a mask means is the model's condition's to say
(segldm.condition)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from segldm.condition import INSTANCES_KEY, LABELS_KEY, LabelCondition
from segldm.data.transforms import crop_offsets, resize_smallest_side

log = logging.getLogger(__name__)
SPLITS = {"val": "val_dataset", "validation": "val_dataset", "train": "train_dataset"}


@dataclass(frozen=True)
class Mask:
    """One condition: its output name, integer label map (H, W), where it came from and, for models
    that condition on instance edges, its instance-id map (H, W)."""

    name: str
    labels: np.ndarray
    source: str
    instances: np.ndarray | None = None

    def sample(self) -> dict[str, np.ndarray]:
        """The mask as one sample's condition keys (segldm.condition.LabelCondition.sample_input)."""
        sample = {LABELS_KEY: self.labels}
        if self.instances is not None:
            sample[INSTANCES_KEY] = self.instances
        return sample


def folder_masks(
    folder: Path, limit: int | None, condition: LabelCondition, instances: Path | None = None
) -> Iterator[Mask]:
    """Every ``*.png`` label map in ``folder`` (sorted by name), or the one file given; with a condition
    that has instance edges, the instance map of the same name in ``instances``."""
    files = (
        [folder] if folder.is_file() else sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")
    )
    if not files:
        raise FileNotFoundError(f"masks={folder}: no .png label maps in this folder")
    for path in files[:limit]:
        instance_file = None
        if condition.instance_edges and instances is not None:
            instance_file = instances / path.name if instances.is_dir() else instances
        read = condition.read_files(path, instance_file)
        yield Mask(path.stem, read[LABELS_KEY], str(path), read.get(INSTANCES_KEY))


def split_masks(model: Any, split: str, limit: int | None) -> Iterator[Mask]:
    """Label maps of the checkpoint's own data config (``masks=val`` / ``masks=train``)."""
    config = model.segldm_config or {}
    data_cfg = config.get("data")
    if not isinstance(data_cfg, dict) or "_target_" not in data_cfg:
        raise ValueError(
            f"masks={split} needs the data config stored in a segldm checkpoint, and this model has none "
            "(a CompVis checkpoint loaded with compvis_config=?); convert it with python -m segldm.convert "
            "compvis, or pass masks=<folder of label PNGs>"
        )
    datamodule = instantiate(OmegaConf.create(data_cfg))
    dataset = getattr(datamodule, SPLITS[split])
    count = len(dataset) if limit is None else min(limit, len(dataset))
    for index in range(count):
        item = dataset[index]
        if isinstance(item, str):  # a skipped sample (data.on_error=skip) carries its error message
            log.warning("masks=%s: sample %d skipped: %s", split, index, item)
            continue
        batch = {k: torch.as_tensor(np.asarray(v))[None] for k, v in item.items() if not k.endswith("_")}
        labels = model.condition.labels_of(batch)[0].numpy()
        instances = model.condition.instances_of(batch)
        yield Mask(
            f"{split}_{index:05d}",
            labels.astype(np.int64),
            f"{split}[{index}]",
            None if instances is None else instances[0].numpy(),
        )


def check_mask(mask: Mask, condition: LabelCondition, multiple: int, why: str) -> None:
    """Labels within the model's range and a size the first stage and UNet can take, else name the file."""
    condition.check_labels(mask.labels, mask.source)
    height, width = mask.labels.shape[:2]
    if mask.labels.ndim != 2 or height % multiple or width % multiple:
        raise ValueError(
            f"{mask.source}: mask size {width}x{height} is not divisible by {multiple} ({why}); crop or resize "
            f"it to e.g. {max(multiple, width - width % multiple)}x{max(multiple, height - height % multiple)}"
        )


RESIZE_MODES = ("model", "round", "none")


def model_resolution(model: Any) -> tuple[int, int]:
    """(height, width) of the images the model was trained on: the checkpoint's ``data.size`` (the
    height) and ``data.aspect`` (width / height, 2 for Cityscapes' 512x256), else the latent size x
    first-stage factor, square."""
    data = (getattr(model, "segldm_config", None) or {}).get("data") or {}
    size = data.get("size") or int(model.image_size) * int(
        getattr(model.first_stage_model, "downsample_factor", 1)
    )
    return int(size), int(round(int(size) * float(data.get("aspect") or 1.0)))


def fit_mask(mask: Mask, mode: str, resolution: int | tuple[int, int], multiple: int) -> Mask:
    """A label map (and its instance map) sized for the model, never blending ids (nearest neighbour).

    ``model``: scale to cover the model's (height, width) and centre-crop it, as the evaluation loaders
    do (SmallestMaxSize + CenterCrop for square models); ``round``: keep its own size, each side
    rounded to the nearest multiple the first stage and UNet can take; ``none``: as given (a size
    they cannot take is refused by :func:`check_mask`).
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize={mode!r}: use one of {list(RESIZE_MODES)}")
    if mode == "none" or mask.labels.ndim != 2:
        return mask
    labels = fit_map(mask.labels, mode, resolution, multiple)
    if labels.shape == mask.labels.shape:
        return mask
    instances = None if mask.instances is None else fit_map(mask.instances, mode, resolution, multiple)
    return Mask(mask.name, labels, f"{mask.source} (resized {mode})", instances)


def fit_map(ids: np.ndarray, mode: str, resolution: int | tuple[int, int], multiple: int) -> np.ndarray:
    """One id map (labels or instances) resized by :func:`fit_mask`'s rule, nearest neighbour."""
    dtype, ids = ids.dtype, ids.astype(np.int32)  # OpenCV resizes no 64-bit integers
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    if mode == "model" and height == width:
        ids = resize_smallest_side(ids, height, cv2.INTER_NEAREST)
        y, x = crop_offsets(ids.shape[0], ids.shape[1], height, random_crop=False)
        ids = ids[y : y + height, x : x + width]
    elif mode == "model":
        scale = max(height / ids.shape[0], width / ids.shape[1])
        covered = (max(width, round(ids.shape[1] * scale)), max(height, round(ids.shape[0] * scale)))
        if covered != (ids.shape[1], ids.shape[0]):
            ids = cv2.resize(ids, covered, interpolation=cv2.INTER_NEAREST)
        y, x = (ids.shape[0] - height) // 2, (ids.shape[1] - width) // 2
        ids = ids[y : y + height, x : x + width]
    else:
        rounded = tuple(max(multiple, int(round(side / multiple)) * multiple) for side in ids.shape)
        if rounded != ids.shape:
            ids = cv2.resize(ids, (rounded[1], rounded[0]), interpolation=cv2.INTER_NEAREST)
    return np.ascontiguousarray(ids).astype(dtype)


def size_multiple(model: Any) -> tuple[int, str]:
    """Mask sides must be multiples of the first stage's factor x what the backbone's input sides must
    be a multiple of (the UNet's downsampling: else its skips do not align); each module says its own."""
    first = int(getattr(model.first_stage_model, "downsample_factor", 1))
    backbone = int(getattr(model.model.diffusion_model, "size_multiple", 1))
    return first * backbone, f"first-stage factor {first} x backbone size multiple {backbone}"
