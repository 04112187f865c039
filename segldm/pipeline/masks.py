"""Masks as users have them: label-map PNG folders or a checkpoint's own data split, checked before
any sampling (labels in range, sizes the first stage and UNet can take)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from hydra.utils import instantiate
from omegaconf import OmegaConf

from segldm.data.transforms import crop_offsets, load_mask, out_of_range, resize_smallest_side

log = logging.getLogger(__name__)
SPLITS = {"val": "val_dataset", "validation": "val_dataset", "train": "train_dataset"}


@dataclass(frozen=True)
class Mask:
    """One condition: its output name, integer label map (H, W) and where it came from."""

    name: str
    labels: np.ndarray
    source: str


def folder_masks(folder: Path, limit: int | None) -> Iterator[Mask]:
    """Every ``*.png`` label map in ``folder`` (sorted by name), or the one file given."""
    files = (
        [folder] if folder.is_file() else sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")
    )
    if not files:
        raise FileNotFoundError(f"masks={folder}: no .png label maps in this folder")
    for path in files[:limit]:
        yield Mask(path.stem, np.asarray(load_mask(path)), str(path))


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
        if "label_map" in item:
            labels = np.asarray(item["label_map"])
        else:
            labels = np.asarray(item["segmentation"]).argmax(axis=-1)
        yield Mask(f"{split}_{index:05d}", labels.astype(np.int64), f"{split}[{index}]")


def check_mask(mask: Mask, n_labels: int, ignore_label: int | None, multiple: int, why: str) -> None:
    """Labels within the model's range and a size the first stage and UNet can take, else name the file."""
    bad = out_of_range(mask.labels, n_labels, ignore_label)
    if bad.size:
        raise ValueError(
            f"{mask.source}: label(s) {bad.tolist()[:10]} >= n_labels={n_labels} of the model (labels must be "
            f"in [0, {n_labels})"
            + (f" or the ignore label {ignore_label})" if ignore_label is not None else ")")
        )
    height, width = mask.labels.shape[:2]
    if mask.labels.ndim != 2 or height % multiple or width % multiple:
        raise ValueError(
            f"{mask.source}: mask size {width}x{height} is not divisible by {multiple} ({why}); crop or resize "
            f"it to e.g. {max(multiple, width - width % multiple)}x{max(multiple, height - height % multiple)}"
        )


RESIZE_MODES = ("model", "round", "none")


def model_resolution(model: Any) -> int:
    """The image side the model was trained at: latent size x first-stage factor."""
    return int(model.image_size) * int(getattr(model.first_stage_model, "downsample_factor", 1))


def fit_mask(mask: Mask, mode: str, resolution: int, multiple: int) -> Mask:
    """A label map sized for the model, never blending labels (nearest neighbour).

    ``model``: scale the smaller side to the model's resolution and centre-crop a square, as the
    evaluation loaders do (SmallestMaxSize + CenterCrop); ``round``: keep its own size, each side
    rounded to the nearest multiple the first stage and UNet can take; ``none``: as given (a size
    they cannot take is refused by :func:`check_mask`).
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize={mode!r}: use one of {list(RESIZE_MODES)}")
    labels = mask.labels
    if mode == "none" or labels.ndim != 2:
        return mask
    if mode == "model":
        labels = resize_smallest_side(labels, resolution, cv2.INTER_NEAREST)
        y, x = crop_offsets(labels.shape[0], labels.shape[1], resolution, random_crop=False)
        labels = labels[y : y + resolution, x : x + resolution]
    else:
        height, width = (max(multiple, int(round(side / multiple)) * multiple) for side in labels.shape)
        if (height, width) != labels.shape:
            labels = cv2.resize(labels, (width, height), interpolation=cv2.INTER_NEAREST)
    if labels.shape == mask.labels.shape:
        return mask
    return Mask(mask.name, np.ascontiguousarray(labels), f"{mask.source} (resized {mode})")


def size_multiple(model: Any) -> tuple[int, str]:
    """Mask sides must be multiples of first-stage factor x UNet downsampling (else skips do not align)."""
    first = int(getattr(model.first_stage_model, "downsample_factor", 1))
    unet = 2 ** (len(getattr(model.model.diffusion_model, "channel_mult", (1,))) - 1)
    return first * unet, f"first-stage factor {first} x UNet downsampling {unet}"
