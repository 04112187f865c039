"""S-FLCKR (taming-transformers layout): a file list, an images root and a segmentations root.

`segmentation_root/<rel>.png` holds the mode-"L" label map of `data_root/<rel>.jpg`. The image is
scaled so its smaller side is `size` and cropped (random for train, centre for eval), the mask
with nearest neighbour; sample keys match the reference loader.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

SFLCKR_N_LABELS = 182


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"SFLCKR dataset not found at {path} ({what} missing). Lay out the taming-transformers "
            "S-FLCKR files there (a file list, images/ and segmentations/) or point data.root=<dir> at them."
        )
    return path


class SegmentationBase(Dataset):
    """taming's `SegmentationBase`: relative paths from `data_csv`, images and label maps by root."""

    def __init__(
        self,
        data_csv: str,
        data_root: str,
        segmentation_root: str,
        size: int | None = None,
        random_crop: bool = False,
        n_labels: int = SFLCKR_N_LABELS,
    ) -> None:
        self.data_csv = _require(Path(data_csv), "file list")
        self.data_root = _require(Path(data_root), "images root")
        self.segmentation_root = _require(Path(segmentation_root), "segmentations root")
        self.relative_paths = [
            line.strip() for line in self.data_csv.read_text().splitlines() if line.strip()
        ]
        if not self.relative_paths:
            raise ValueError(f"the SFLCKR file list {self.data_csv} is empty")
        self.size = size if size and size > 0 else None
        self.random_crop = random_crop
        self.n_labels = n_labels

    def __len__(self) -> int:
        return len(self.relative_paths)

    def _paths(self, i: int) -> tuple[Path, Path]:
        rel = self.relative_paths[i]
        return self.data_root / rel, self.segmentation_root / (
            rel[: -len(".jpg")] + ".png" if rel.endswith(".jpg") else rel
        )

    def __getitem__(self, i: int) -> dict[str, object]:
        image_path, seg_path = self._paths(i)
        image = Image.open(image_path).convert("RGB")
        seg = Image.open(seg_path)
        if seg.mode != "L":
            raise ValueError(f"{seg_path}: segmentation must be a mode 'L' label map, got mode {seg.mode!r}")
        if self.size is not None:
            scale = self.size / min(image.size)
            new = (round(image.width * scale), round(image.height * scale))
            if scale != 1:
                image = image.resize(new, Image.BICUBIC)
                seg = seg.resize(new, Image.NEAREST)
        image_np, labels = np.asarray(image), np.asarray(seg).astype(np.int64)
        if labels.max(initial=0) >= self.n_labels:
            raise ValueError(f"{seg_path}: label {labels.max()} is outside [0, {self.n_labels})")
        if self.size is not None:
            h, w = labels.shape
            if self.random_crop:
                y, x = int((h - self.size) * random.random()), int((w - self.size) * random.random())
            else:
                y, x = (h - self.size) // 2, (w - self.size) // 2
            image_np = image_np[y : y + self.size, x : x + self.size]
            labels = labels[y : y + self.size, x : x + self.size]
        return {
            "image": torch.from_numpy(image_np.astype(np.float32) / 127.5 - 1.0),
            "segmentation": torch.from_numpy(np.eye(self.n_labels, dtype=np.float32)[labels]),
            "label_map": torch.from_numpy(labels),
            "relative_file_path_": self.relative_paths[i],
        }


class FlickrSegTrain(SegmentationBase):
    """The seed config's `ldm.data.flickr.FlickrSegTrain`: random crops of the training list."""

    def __init__(
        self, size: int = 256, root: str = "data/sflckr", file_list: str = "sflckr_train.txt"
    ) -> None:
        root_path = _require(Path(root), "dataset root")
        super().__init__(
            str(root_path / file_list),
            str(root_path / "images"),
            str(root_path / "segmentations"),
            size,
            True,
        )


class FlickrSegEval(SegmentationBase):
    """The seed config's `ldm.data.flickr.FlickrSegEval`: centre crops of the validation list."""

    def __init__(
        self, size: int = 256, root: str = "data/sflckr", file_list: str = "sflckr_eval.txt"
    ) -> None:
        root_path = _require(Path(root), "dataset root")
        super().__init__(
            str(root_path / file_list),
            str(root_path / "images"),
            str(root_path / "segmentations"),
            size,
            False,
        )
