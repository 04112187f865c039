"""Which of a dataset's label ids a segmenter scores, as which of its classes.

A benchmark's masks and its protocol segmenter rarely share ids: ADE20K masks carry 151 channels (150
classes + SPADE's "other"), CSAIL's UPerNet predicts the 150; COCO-Stuff masks 183 (182 + don't-care),
DeepLabV2 predicts 182; Cityscapes masks carry the 35 labelIds, DRN-D-105 predicts the 19 trainIds. A
label map turns a mask into the segmenter's class ids (:data:`NOT_SCORED` where the protocol does not
score a pixel) and refuses a dataset whose label set it does not fit, before any sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from cityscapesscripts.helpers.labels import labels as cityscapes_labels

NOT_SCORED = -1


class LabelSpaceMismatch(ValueError):
    """The segmenter's classes do not fit the dataset's labels."""


class LabelMap(Protocol):
    """A dataset id -> segmenter class table for a dataset with ``n_labels`` ids."""

    description: str

    def lookup(self, n_labels: int, ignore_label: int | None) -> np.ndarray: ...


def ignored(table: np.ndarray, ignore_label: int | None) -> np.ndarray:
    if ignore_label is not None and 0 <= ignore_label < len(table):
        table[ignore_label] = NOT_SCORED
    return table


@dataclass(frozen=True)
class SameIds:
    """Dataset ids 0..n_classes-1 are the segmenter's classes; up to ``dontcare_channels`` trailing ids
    (SPADE's ``contain_dontcare_label`` channel) are not scored."""

    n_classes: int
    dontcare_channels: int = 1

    @property
    def description(self) -> str:
        return (
            f"dataset ids 0..{self.n_classes - 1} = classes; ids >= {self.n_classes} (don't-care) not scored"
        )

    def lookup(self, n_labels: int, ignore_label: int | None) -> np.ndarray:
        if not self.n_classes <= n_labels <= self.n_classes + self.dontcare_channels:
            extra = f" (+{self.dontcare_channels} don't-care)" if self.dontcare_channels else ""
            raise LabelSpaceMismatch(
                f"the segmenter predicts {self.n_classes} classes{extra} but the data has "
                f"data.n_labels={n_labels}: its classes are not this dataset's; use the segmenter of this "
                "dataset (conf/segmenter) or one trained on it (segmenter=trained, python -m segldm.train_segmenter)"
            )
        table = np.arange(n_labels, dtype=np.int64)
        table[self.n_classes :] = NOT_SCORED
        return ignored(table, ignore_label)


@dataclass(frozen=True)
class PermutedIds:
    """Dataset id i is the segmenter's class ``order[i]`` (a parser trained with another class order)."""

    order: Sequence[int]
    n_classes: int

    @property
    def description(self) -> str:
        return f"dataset id i -> class order[i], order={list(self.order)}"

    def lookup(self, n_labels: int, ignore_label: int | None) -> np.ndarray:
        if n_labels != len(self.order):
            raise LabelSpaceMismatch(
                f"the segmenter's label map covers {len(self.order)} dataset ids but data.n_labels={n_labels}"
            )
        return ignored(np.asarray(self.order, dtype=np.int64).copy(), ignore_label)


@dataclass(frozen=True)
class CityscapesTrainIds:
    """Cityscapes labelIds (35, as SPADE feeds them) -> the 19 evaluated trainIds of cityscapesscripts'
    table, every other id not scored; masks already in trainIds (19 + ignore 255) pass through."""

    description: str = "Cityscapes labelIds -> 19 trainIds (cityscapesscripts table); other ids not scored"

    def lookup(self, n_labels: int, ignore_label: int | None) -> np.ndarray:
        if n_labels == 19:
            return ignored(np.arange(19, dtype=np.int64), ignore_label)
        if n_labels != 35:
            raise LabelSpaceMismatch(
                f"the segmenter predicts the 19 Cityscapes trainIds; the data has data.n_labels={n_labels}, "
                "neither the 35 labelIds (data.label_encoding=id) nor the 19 trainIds (label_encoding=trainId)"
            )
        table = np.full(35, NOT_SCORED, dtype=np.int64)
        for label in cityscapes_labels:
            if 0 <= label.id < 35 and 0 <= label.trainId < 19 and not label.ignoreInEval:
                table[label.id] = label.trainId
        return ignored(table, ignore_label)


def apply_label_map(table: np.ndarray, labels: np.ndarray, ignore_label: int | None) -> np.ndarray:
    """A mask's ids as segmenter classes (NOT_SCORED where not scored). An id outside the table that is
    not the ignore label is an error: the mask does not belong to the dataset the table was made for."""
    labels = np.asarray(labels).astype(np.int64, copy=False)
    inside = (labels >= 0) & (labels < len(table))
    out = np.full(labels.shape, NOT_SCORED, dtype=np.int64)
    out[inside] = table[labels[inside]]
    stray = ~inside & (labels != (ignore_label if ignore_label is not None else NOT_SCORED))
    if stray.any():
        raise LabelSpaceMismatch(
            f"mask ids {np.unique(labels[stray])[:10].tolist()} are outside the dataset's 0..{len(table) - 1} "
            f"(ignore label: {ignore_label})"
        )
    return out


__all__ = [
    "NOT_SCORED",
    "CityscapesTrainIds",
    "LabelMap",
    "LabelSpaceMismatch",
    "PermutedIds",
    "SameIds",
    "apply_label_map",
]
