"""S-FLCKR in the taming-transformers layout: a file list, an images root, a segmentations root.

`segmentation_root/<rel with .jpg -> .png>` holds the label map (182 COCO-Stuff ids) of
`data_root/<rel>`. Loading reproduces taming's `SegmentationBase` (OpenCV bicubic
`SmallestMaxSize`, nearest for the mask, centre or random crop, image in [-1, 1]) through the shared
`PairedSegmentation`, so it gets the same file, size and label checks as `data=folder`.
`FlickrSegTrain` / `FlickrSegEval` are the names the seed config (`ldm.data.flickr.*`) uses and the
public CompVis code never shipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segldm.data.folder import Pair, PairedSegmentation, read_file_list
from segldm.data.transforms import LabelRemap

SFLCKR_N_LABELS = 182
TRAIN_LIST = "sflckr_train.txt"
EVAL_LIST = "sflckr_eval.txt"
IMAGES_DIR = "images"
SEGMENTATIONS_DIR = "segmentations"


def _not_found(path: Path, what: str, key: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"SFLCKR dataset not found at {path} ({what} missing). Lay out the taming-transformers S-FLCKR files "
        f"there (a file list, an images folder and a segmentations folder) or set {key}=<path>."
    )


class SegmentationBase(PairedSegmentation):
    """taming's `SegmentationBase(data_csv, data_root, segmentation_root, size, random_crop, ...)`.

    `shift_segmentation` adds 1 to every id in uint8 (255 wraps to 0), as the reference option.
    Beyond the reference: `ignore_label`, `one_hot` (the reference always one-hots) and `on_error`.
    """

    def __init__(
        self,
        data_csv: str,
        data_root: str,
        segmentation_root: str,
        size: int | None = None,
        random_crop: bool = False,
        interpolation: str = "bicubic",
        n_labels: int = SFLCKR_N_LABELS,
        shift_segmentation: bool = False,
        *,
        ignore_label: int | None = None,
        one_hot: bool = True,
        on_error: str = "raise",
        name: str = "data=sflckr",
    ) -> None:
        self.data_csv = Path(data_csv)
        self.data_root = Path(data_root)
        self.segmentation_root = Path(segmentation_root)
        for path, what, key in (
            (self.data_root, "images folder", "data.images_dir"),
            (self.segmentation_root, "segmentations folder", "data.segmentations_dir"),
            (self.data_csv, "file list", "data.train_list / data.eval_list"),
        ):
            if not path.exists():
                raise _not_found(path, what, key)
        relative_paths = read_file_list(self.data_csv, name)
        pairs = [
            Pair(rel, self.data_root / rel, self.segmentation_root / rel.replace(".jpg", ".png"))
            for rel in relative_paths
        ]
        remap = None
        if shift_segmentation:  # uint8 + 1: 255 -> 0, as the reference
            remap = LabelRemap(list((np.arange(256) + 1) % 256), 256, None)
        super().__init__(
            pairs,
            n_labels=n_labels,
            size=size,
            random_crop=random_crop,
            flip=False,
            ignore_label=ignore_label,
            label_remap=remap,
            interpolation=interpolation,
            one_hot=one_hot,
            on_error=on_error,
            name=name,
        )

    @property
    def relative_paths(self) -> list[str]:
        return [pair.relative for pair in self.pairs]


class _FlickrSeg(SegmentationBase):
    """S-FLCKR under one root: `<root>/<list>`, `<root>/<images_dir>`, `<root>/<segmentations_dir>`.

    Subclasses only choose the split: its default file list, whether crops are random, its name.
    """

    default_list: str
    default_random_crop: bool
    split: str

    def __init__(
        self,
        size: int = 256,
        root: str = "data/sflckr",
        file_list: str | None = None,
        images_dir: str = IMAGES_DIR,
        segmentations_dir: str = SEGMENTATIONS_DIR,
        random_crop: bool | None = None,
        interpolation: str = "bicubic",
        n_labels: int = SFLCKR_N_LABELS,
        ignore_label: int | None = None,
        one_hot: bool = True,
        on_error: str = "raise",
    ) -> None:
        root_path = Path(root)
        if not root_path.is_dir():
            raise _not_found(root_path, "dataset root", "data.root")
        super().__init__(
            str(root_path / (file_list or self.default_list)),
            str(root_path / images_dir),
            str(root_path / segmentations_dir),
            size,
            self.default_random_crop if random_crop is None else random_crop,
            interpolation,
            n_labels,
            ignore_label=ignore_label,
            one_hot=one_hot,
            on_error=on_error,
            name=f"data=sflckr ({self.split})",
        )


class FlickrSegTrain(_FlickrSeg):
    """The seed config's `ldm.data.flickr.FlickrSegTrain`: random crops of the training list."""

    default_list, default_random_crop, split = TRAIN_LIST, True, "train"


class FlickrSegEval(_FlickrSeg):
    """The seed config's `ldm.data.flickr.FlickrSegEval`: centre crops of the evaluation list."""

    default_list, default_random_crop, split = EVAL_LIST, False, "validation"
