"""Cityscapes (`leftImg8bit_trainvaltest.zip` + `gtFine_trainvaltest.zip`) as distributed.

Layout under `data.root`::

    leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png      2048x1024 RGB
    gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png       mode L, ids 0..33
    gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_instanceIds.png    16 bit: id, or id x 1000 + k

The ids and their meaning come from the dataset's own label table (`cityscapesscripts.helpers.labels`,
imported when a Cityscapes split is built). The preset follows SPADE (docs/datasets.md#cityscapes):
label ids as channels (0..33 of 35), no don't-care channel, instance edges from the instanceIds files,
512x256 (aspect 2). `label_encoding=trainId` gives the 19 evaluation classes instead (others ignored).
"""

from __future__ import annotations

from typing import Any

from segldm.data.layouts import (
    BenchmarkSegmentation,
    IdRule,
    id_range_text,
    index_files,
    layout_root,
    pair_up,
    require_folders,
)
from segldm.errors import StartupError

SPLITS = ("train", "val")
ENCODINGS = ("id", "trainId")
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
INSTANCE_SUFFIX = "_gtFine_instanceIds.png"


def cityscapes_labels() -> list[Any]:
    """The dataset's label table (`cityscapesscripts.helpers.labels.labels`), imported on first use."""
    try:
        from cityscapesscripts.helpers.labels import labels
    except ImportError as err:
        raise StartupError(
            "data=cityscapes reads the label table of the Cityscapes scripts (the `cityscapesscripts` package), "
            "which is not installed: pip install cityscapesscripts (a dependency of segldm)"
        ) from err
    return list(labels)


def label_table(encoding: str, ignore_label: int | None) -> dict[int, int]:
    """{labelId: channel} for every id a labelIds file can hold (the table's ids >= 0).

    `id`: the id itself (SPADE, OASIS, SDM). `trainId`: the table's train id; ids whose train id is
    255 (or -1) go to `ignore_label`.
    """
    if encoding not in ENCODINGS:
        raise StartupError(f"data=cityscapes: data.label_encoding={encoding!r} is not one of {ENCODINGS}")
    labels = [label for label in cityscapes_labels() if label.id >= 0]
    if encoding == "id":
        return {label.id: label.id for label in labels}
    if ignore_label is None:
        raise StartupError(
            "data=cityscapes: data.label_encoding=trainId maps the classes Cityscapes does not evaluate to "
            "data.ignore_label, which is null; set data.ignore_label=255"
        )
    return {label.id: ignore_label if label.trainId in (255, -1) else label.trainId for label in labels}


def class_names(encoding: str = "id") -> list[str]:
    """Channel names in order: label names by id, or the 19 train-id classes."""
    labels = cityscapes_labels()
    if encoding == "trainId":
        named = {label.trainId: label.name for label in reversed(labels) if label.trainId not in (255, -1)}
    else:
        named = {label.id: label.name for label in labels if label.id >= 0}
    return [named.get(i, "") for i in range(max(named) + 1)]


class Cityscapes(BenchmarkSegmentation):
    """One split (`train` or `val`) of Cityscapes' fine annotations, with instanceIds as instance maps."""

    preset = "data=cityscapes"
    dataset = "Cityscapes"
    has_instances = True
    instance_modes = ("I", "I;16", "I;16L", "I;16B", "I;16N")
    instance_expected = "a 16-bit id map (a *_gtFine_instanceIds.png: class id, or class id x 1000 + k)"

    def __init__(
        self,
        root: str,
        split: str = "train",
        *,
        n_labels: int = 35,
        label_encoding: str = "id",
        ignore_label: int | None = None,
        size: int | None = 256,
        aspect: float = 2.0,
        load_scale: float = 1.0,
        fit: str = "stretch",
        random_crop: bool = False,
        flip: bool = False,
        interpolation: str = "pil_bicubic",
        instance_edges: bool = False,
        one_hot: bool = True,
        on_error: str = "raise",
    ) -> None:
        if split not in SPLITS:
            raise ValueError(
                f"{self.preset}: split={split!r} is not one of {SPLITS} (gtFine/test has no labels)"
            )
        table = label_table(label_encoding, ignore_label)
        rule = IdRule(table, n_labels, ignore_label, f"labelIds {id_range_text(table)}", self.preset)
        self.label_encoding = label_encoding
        self.root = layout_root(root, "cityscapes", "gtFine")
        images, labels = self.root / "leftImg8bit" / split, self.root / "gtFine" / split
        require_folders(
            self.preset,
            self.dataset,
            self.root,
            [
                (
                    self.root / "leftImg8bit",
                    "the photos, leftImg8bit/{train,val}/<city>/ (leftImg8bit_trainvaltest.zip)",
                ),
                (
                    self.root / "gtFine",
                    "the fine annotations, gtFine/{train,val}/<city>/ (gtFine_trainvaltest.zip)",
                ),
                (images, f"the {split} photos"),
                (labels, f"the {split} annotations"),
            ],
            "point data.root at the folder holding leftImg8bit/ and gtFine/",
        )
        pairs = pair_up(
            index_files(images, IMAGE_SUFFIX, recursive=True),
            index_files(labels, LABEL_SUFFIX, recursive=True),
            lambda key: images / f"{key}{IMAGE_SUFFIX}",
            lambda key: labels / f"{key}{LABEL_SUFFIX}",
            images,
            lambda key: labels / f"{key}{INSTANCE_SUFFIX}",
        )
        super().__init__(
            pairs,
            n_labels=n_labels,
            size=size,
            random_crop=random_crop,
            flip=flip,
            ignore_label=ignore_label,
            label_remap=rule,
            interpolation=interpolation,
            one_hot=one_hot,
            on_error=on_error,
            name=f"{self.preset} ({split})",
            aspect=aspect,
            load_scale=load_scale,
            fit=fit,
            instance_edges=instance_edges,
        )

    @property
    def class_names(self) -> list[str]:
        return class_names(self.label_encoding)
