"""Segmentation networks that label images for mIoU: what every segmenter offers, and real-image pairs.

A segmenter takes uint8 RGB images (N, 3, H, W), exactly what is written to disk as PNG, and returns
(N, H, W) int64 labels in ``[0, n_classes)``; its ``label_map`` says which mask ids it scores as which
class (:mod:`.label_maps`), and ``card()`` what made its labels (weights sha256, reference code,
preprocessing). Options (``conf/segmenter/``): the benchmarks' protocol networks and ``trained``
(:mod:`.trained`, trained on a dataset's own real images by ``segldm.train_segmenter``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from segldm.metrics.miou import ConfusionMatrix, SegmentationScores, per_image_counts
from segldm.metrics.segmenters.label_maps import NOT_SCORED, LabelMap, apply_label_map


class Segmenter(Protocol):
    """What eval needs from a segmentation network."""

    n_classes: int
    name: str
    label_map: LabelMap
    class_names: list[str] | None

    def predict(self, images: torch.Tensor) -> torch.Tensor: ...

    def card(self) -> dict[str, Any]: ...


def scored_targets(segmenter: Segmenter, n_labels: int, ignore_label: int | None) -> Any:
    """The mask -> segmenter-class function for this dataset; refuses a segmenter whose classes do not
    fit the dataset's labels (a ValueError naming both), so it fails before any sampling."""
    table = segmenter.label_map.lookup(n_labels, ignore_label)

    def targets(labels: np.ndarray) -> np.ndarray:
        return apply_label_map(table, labels, ignore_label)

    return targets


def class_names_of(segmenter: Segmenter, n_labels: int, ignore_label: int | None, dataset_names: Sequence[str] | None) -> list[str]:
    """The segmenter's class names: its own, else the dataset's name of the id mapped to each class."""
    if segmenter.class_names:
        return list(segmenter.class_names)
    names = [str(i) for i in range(segmenter.n_classes)]
    if dataset_names:
        table = segmenter.label_map.lookup(n_labels, ignore_label)
        for dataset_id in range(min(len(table), len(dataset_names)) - 1, -1, -1):
            if table[dataset_id] != NOT_SCORED:
                names[int(table[dataset_id])] = str(dataset_names[dataset_id])
    return names


@dataclass(frozen=True)
class RealPair:
    """One validation sample: output name, real image (H, W, 3) uint8, label map (H, W) int64 and, when
    the dataset ships them, its instance map (H, W) (the condition's edge channel)."""

    name: str
    index: int
    image: np.ndarray | None
    labels: np.ndarray
    instances: np.ndarray | None = None

    def sample(self) -> dict[str, np.ndarray]:
        """The pair's condition keys, as a dataset sample has them."""
        sample = {"label_map": self.labels}
        if self.instances is not None:
            sample["instance_map"] = self.instances
        return sample


def image_to_uint8(image: Any) -> np.ndarray:
    """A dataset's ``image`` (H, W, 3) float in [-1, 1] -> uint8, inverting x / 127.5 - 1 exactly."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    return np.clip(np.round((array.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def labels_of(item: dict[str, Any]) -> np.ndarray | None:
    """The sample's label map (from ``label_map``, or the argmax of the one-hot ``segmentation``)."""
    if "label_map" in item:
        value = item["label_map"]
    elif "segmentation" in item:
        seg = item["segmentation"]
        value = seg.argmax(-1) if isinstance(seg, torch.Tensor) else np.asarray(seg).argmax(-1)
    else:
        return None
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    return array.astype(np.int64)


def real_pairs(dataset: Dataset, count: int, prefix: str = "val", log: Any = None) -> Iterator[RealPair]:
    """The first ``count`` samples of a dataset as :class:`RealPair` (skipped samples are left out)."""
    for index in range(count):
        item = dataset[index]
        if isinstance(item, str):  # data.on_error=skip: the sample's error message
            if log is not None:
                log.warning("sample %d skipped: %s", index, item)
            continue
        labels = labels_of(item)
        if labels is None:
            raise ValueError(
                f"{type(dataset).__name__}[{index}] has no mask (neither 'label_map' nor 'segmentation' "
                f"among its keys {sorted(item)}); evaluation generates from masks and scores against them, "
                "so the data config must yield masks (data=synthetic, sflckr or folder with masks)"
            )
        image = image_to_uint8(item["image"]) if "image" in item else None
        instances = np.asarray(item["instance_map"]).astype(np.int64) if "instance_map" in item else None
        yield RealPair(f"{prefix}_{index:05d}", index, image, labels, instances)


def segment_scores(
    segmenter: Segmenter,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    n_labels: int,
    ignore_label: int | None,
    class_names: Sequence[str] | None = None,
    batch_size: int = 16,
    progress: Any = None,
) -> SegmentationScores:
    """Label every image with the segmenter and score it against its mask (mapped to the segmenter's
    classes by its label map) over the whole set."""
    targets = scored_targets(segmenter, n_labels, ignore_label)
    matrix = ConfusionMatrix(segmenter.n_classes, NOT_SCORED)
    per_image = np.zeros((len(images), 3, segmenter.n_classes), dtype=np.int64)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(i)
    for indices in by_shape.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            batch = torch.from_numpy(np.stack([images[i] for i in chunk])).permute(0, 3, 1, 2).contiguous()
            pred = segmenter.predict(batch)
            for row, i in enumerate(chunk):
                per_image[i] = per_image_counts(matrix.update(pred[row], targets(labels[i])))
            if progress is not None:
                progress.update(len(chunk))
    scores = matrix.compute(class_names)
    scores.per_image = per_image
    return scores


__all__ = [
    "RealPair",
    "Segmenter",
    "class_names_of",
    "image_to_uint8",
    "labels_of",
    "real_pairs",
    "scored_targets",
    "segment_scores",
]
