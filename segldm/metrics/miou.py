"""Segmentation scores over a whole evaluation set: one confusion matrix, then IoU per class.

mIoU is computed from the summed confusion matrix (not averaged per image), as the COCO-Stuff /
Cityscapes protocols do: per-image averages over-weight small images and classes absent from an
image. Pixels whose target is the ignore label are not counted; a class absent from both targets
and predictions has no IoU (NaN) and is left out of the mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def _as_int64(array: ArrayLike) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    return np.asarray(array).astype(np.int64, copy=False)


def confusion_matrix(
    pred: ArrayLike, target: ArrayLike, n_classes: int, ignore_label: int | None = None
) -> np.ndarray:
    """(n_classes, n_classes) int64 counts: rows are target classes, columns predicted classes.

    Target pixels equal to ``ignore_label`` are skipped. A target or prediction outside
    ``[0, n_classes)`` (other than the ignore label) is an error: it means the segmenter and the
    dataset disagree on the label set, and silently dropping those pixels would inflate the score.
    """
    pred, target = _as_int64(pred), _as_int64(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
    keep = np.ones(target.shape, dtype=bool) if ignore_label is None else target != ignore_label
    pred, target = pred[keep], target[keep]
    for name, values in (("target", target), ("prediction", pred)):
        bad = values[(values < 0) | (values >= n_classes)]
        if bad.size:
            raise ValueError(
                f"{name} label(s) {np.unique(bad)[:10].tolist()} outside [0, {n_classes}) "
                f"(ignore label: {ignore_label}); the segmenter's classes must be the dataset's labels"
            )
    return np.bincount(target * n_classes + pred, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )


def per_image_counts(matrix: np.ndarray) -> np.ndarray:
    """(3, C) per-class (intersection, predicted, target) pixel counts of one confusion matrix: additive
    over images, so a resample of images has the summed-confusion mIoU of its summed counts."""
    matrix = np.asarray(matrix)
    return np.stack([np.diag(matrix), matrix.sum(0), matrix.sum(1)])


@dataclass
class SegmentationScores:
    """mIoU, pixel accuracy and per-class IoU (NaN for classes absent from targets and predictions)."""

    miou: float
    pixel_accuracy: float
    per_class_iou: list[float]
    present: list[bool]
    pixels: int
    class_names: list[str] = field(default_factory=list)
    per_image: np.ndarray | None = None  # (N, 3, C) per_image_counts of each image, when scored per image

    def table(self) -> list[dict[str, object]]:
        """One row per class: id, name and IoU (None for a class absent from targets and predictions)."""
        names = self.class_names or [str(i) for i in range(len(self.per_class_iou))]
        return [
            {"id": i, "name": names[i], "iou": None if not p else float(iou)}
            for i, (iou, p) in enumerate(zip(self.per_class_iou, self.present, strict=True))
        ]


def scores_from_confusion(matrix: np.ndarray, class_names: Sequence[str] | None = None) -> SegmentationScores:
    """IoU_c = TP / (TP + FP + FN) from a summed confusion matrix; classes with TP+FP+FN = 0 are skipped."""
    matrix = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - tp
    present = union > 0
    iou = np.full(len(tp), np.nan)
    iou[present] = tp[present] / union[present]
    total = matrix.sum()
    return SegmentationScores(
        miou=float(iou[present].mean()) if present.any() else float("nan"),
        pixel_accuracy=float(tp.sum() / total) if total > 0 else float("nan"),
        per_class_iou=iou.tolist(),
        present=present.tolist(),
        pixels=int(total),
        class_names=list(class_names or []),
    )


class ConfusionMatrix:
    """Accumulates one confusion matrix over batches of (prediction, target) label maps."""

    def __init__(self, n_classes: int, ignore_label: int | None = None) -> None:
        if n_classes <= 0:
            raise ValueError(f"n_classes must be positive, got {n_classes}")
        self.n_classes = n_classes
        self.ignore_label = ignore_label
        self.matrix = np.zeros((n_classes, n_classes), dtype=np.int64)

    def update(self, pred: ArrayLike, target: ArrayLike) -> np.ndarray:
        """Add one image (or batch); returns its own confusion matrix."""
        matrix = confusion_matrix(pred, target, self.n_classes, self.ignore_label)
        self.matrix += matrix
        return matrix

    def compute(self, class_names: Sequence[str] | None = None) -> SegmentationScores:
        return scores_from_confusion(self.matrix, class_names)


__all__ = [
    "ConfusionMatrix",
    "SegmentationScores",
    "confusion_matrix",
    "per_image_counts",
    "scores_from_confusion",
]
