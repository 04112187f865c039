"""CelebAMask-HQ (`CelebAMask-HQ.zip`) as distributed: photos plus one binary mask per face part.

Layout under `data.root` (the unzipped `CelebAMask-HQ/`, or the folder holding it)::

    CelebA-HQ-img/<k>.jpg                                   k = 0..29999, 1024x1024
    CelebAMask-HQ-mask-anno/<k // 2000>/<k:05d>_<part>.png  512x512, non-zero = the part
    CelebA-HQ-to-CelebA-mapping.txt                         (only for split_protocol=celeba)

The 18 part masks of a face are merged as the dataset's own preprocessing does
(face_parsing/Data_preprocessing/g_mask.py): parts in `PARTS` order, label = index + 1, a later
part overwrites an earlier one, background 0 - 19 labels. Images are reduced to their masks' size
(1024 -> 512, a 2x2 box average: OpenCV INTER_AREA) before any other resize. The preset follows
SEAN (docs/datasets.md#celebamask-hq): 19 channels, no instance maps, faces 0..27999 train and
28000..29999 test.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from segldm.data.folder import Pair, _shape, empty_report
from segldm.data.layouts import BenchmarkSegmentation, IdRule, layout_root, require_folders
from segldm.data.transforms import (
    INTERPOLATIONS,
    MISSING,
    SIZE_MISMATCH,
    SKIP_HINT,
    SampleError,
    check_same_size,
    header,
    open_fully,
    resize_to,
)
from segldm.errors import MissingFileError, StartupError

# g_mask.py's label_list ("list2", line 9): part i gets label i + 1
PARTS = (
    "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
    "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth",
)  # fmt: skip
CLASS_NAMES = ("background", *PARTS)
TOP = "CelebAMask-HQ"
IMAGES_DIR = "CelebA-HQ-img"
PARTS_DIR = "CelebAMask-HQ-mask-anno"
MAPPING_FILE = "CelebA-HQ-to-CelebA-mapping.txt"
FACES_PER_FOLDER = 2000  # g_mask.py: folder_num = k // 2000
N_FACES = 30000
SEAN_TRAIN = 28000  # SEAN: faces 0..27999 train, 28000..29999 test
CELEBA_VAL, CELEBA_TEST = 162771, 182638  # first CelebA index of its val / test partition (g_partition.py)
PROTOCOLS = {"sean": ("train", "test"), "celeba": ("train", "val", "test")}
_PART_FILE = re.compile(r"^(\d+)_(.+)\.png$")


def sean_split(face: int) -> str:
    return "train" if face < SEAN_TRAIN else "test"


def celeba_partition(mapping: Path) -> dict[int, str]:
    """{CelebA-HQ index: train/val/test} by CelebA's own partition of the original image (g_partition.py)."""
    if not mapping.is_file():
        raise MissingFileError(
            f"data=celebamask_hq: split_protocol=celeba needs {mapping} (CelebA-HQ-to-CelebA-mapping.txt from "
            "the CelebAMask-HQ download); or use split_protocol=sean"
        )
    splits = {}
    for line in mapping.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0].isdigit() and fields[1].isdigit():
            original = int(fields[1])
            splits[int(fields[0])] = (
                "train" if original < CELEBA_VAL else "val" if original < CELEBA_TEST else "test"
            )
    if not splits:
        raise StartupError(f"data=celebamask_hq: {mapping} holds no 'idx orig_idx orig_file' lines")
    return splits


def reducible(image: tuple[int, ...], mask: tuple[int, ...], pair: Pair) -> bool:
    """Whether an image of (height, width) `image` must be reduced to the mask's; an image of another
    shape, or a smaller one, is a SampleError naming both sizes."""
    (ih, iw), (mh, mw) = image, mask
    if (ih, iw) == (mh, mw):
        return False
    if ih * mw == iw * mh and ih > mh:
        return True
    check_same_size(np.empty((ih, iw, 0)), np.empty((mh, mw, 0)), pair.image, pair.mask)  # raises
    return False


def part_mask(path: Path) -> np.ndarray:
    """A part file -> (H, W) bool: g_mask.py's `cv2.imread(path)[:, :, 0] != 0` (the blue channel)."""
    image = open_fully(path, "part mask")
    return np.asarray(image.convert("RGB"))[..., 2] != 0


class CelebAMaskHQ(BenchmarkSegmentation):
    """One split of CelebAMask-HQ, part masks merged into a 19-label map on the fly."""

    preset = "data=celebamask_hq"
    dataset = "CelebAMask-HQ"
    has_instances = False

    def __init__(
        self,
        root: str,
        split: str = "train",
        split_protocol: str = "sean",
        *,
        n_labels: int = 19,
        ignore_label: int | None = None,
        size: int | None = 256,
        aspect: float = 1.0,
        load_scale: float = 1.0,
        fit: str = "stretch",
        random_crop: bool = False,
        flip: bool = False,
        interpolation: str = "pil_bicubic",
        instance_edges: bool = False,
        one_hot: bool = True,
        on_error: str = "raise",
    ) -> None:
        self.no_instances(instance_edges, "SEAN trains it without; its part masks hold no instance ids")
        if split_protocol not in PROTOCOLS:
            raise StartupError(
                f"{self.preset}: data.split_protocol={split_protocol!r} is not one of {list(PROTOCOLS)}"
            )
        if split not in PROTOCOLS[split_protocol]:
            raise ValueError(
                f"{self.preset}: split={split!r} is not one of {PROTOCOLS[split_protocol]} (split_protocol={split_protocol})"
            )
        rule = IdRule(
            {i: i for i in range(len(CLASS_NAMES))}, n_labels, ignore_label, "labels 0-18", self.preset
        )
        self.root = layout_root(root, TOP, IMAGES_DIR)
        self.images_dir, self.parts_dir = self.root / IMAGES_DIR, self.root / PARTS_DIR
        require_folders(
            self.preset,
            self.dataset,
            self.root,
            [
                (self.images_dir, "the photos, CelebA-HQ-img/<k>.jpg"),
                (self.parts_dir, "the part masks, CelebAMask-HQ-mask-anno/<k // 2000>/<k:05d>_<part>.png"),
            ],
            "point data.root at the unzipped CelebAMask-HQ folder",
        )
        if split_protocol == "sean":
            in_split = lambda face: 0 <= face < N_FACES and sean_split(face) == split  # noqa: E731
        else:
            partition = celeba_partition(self.root / MAPPING_FILE)
            in_split = lambda face: partition.get(face) == split  # noqa: E731
        images = {
            int(path.stem): path
            for path in self.images_dir.glob("*.jpg")
            if path.stem.isdigit() and in_split(int(path.stem))
        }
        self.face_parts = self._list_parts(in_split)
        pairs = []
        for face in sorted(set(images) | set(self.face_parts)):
            parts = self.face_parts.get(face)
            mask = (
                parts[0][1] if parts else self.parts_dir / str(face // FACES_PER_FOLDER) / f"{face:05d}_*.png"
            )
            pairs.append(Pair(f"{face}.jpg", images.get(face, self.images_dir / f"{face}.jpg"), mask))
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
            instance_edges=False,
        )

    def _list_parts(self, in_split: Any) -> dict[int, list[tuple[int, Path]]]:
        """{face: [(part index, file), ...] in PARTS order}, as g_mask.py finds them (folder k // 2000)."""
        order = {name: i for i, name in enumerate(PARTS)}
        found: dict[int, list[tuple[int, Path]]] = {}
        for folder in self.parts_dir.iterdir():
            if not (folder.is_dir() and folder.name.isdigit()):
                continue
            for path in folder.iterdir():
                match = _PART_FILE.match(path.name)
                if match is None or match.group(2) not in order:
                    continue
                face = int(match.group(1))
                if face // FACES_PER_FOLDER == int(folder.name) and in_split(face):
                    found.setdefault(face, []).append((order[match.group(2)], path))
        return {face: sorted(parts) for face, parts in found.items()}

    def _parts(self, pair: Pair) -> list[tuple[int, Path]]:
        return self.face_parts.get(int(pair.relative[: -len(".jpg")]), [])

    # ------------------------------------------------------------------ PairedSegmentation hooks
    def files_of(self, pair: Pair) -> list[tuple[str, Path]]:
        parts = self._parts(pair)
        files = [("image", pair.image)] + [("part mask", path) for _, path in parts]
        return files if parts else [*files, ("part masks", pair.mask)]  # `pair.mask` is then a pattern

    def load_labels(self, pair: Pair) -> np.ndarray:
        """g_mask.py's merge: zeros, then each part in order sets its pixels to index + 1."""
        labels: np.ndarray | None = None
        for index, path in self._parts(pair):
            part = part_mask(path)
            if labels is None:
                labels = np.zeros(part.shape, dtype=np.uint8)
            elif part.shape != labels.shape:
                raise SampleError(
                    f"{path}: part mask is {part.shape[1]}x{part.shape[0]} but the face's other parts are "
                    f"{labels.shape[1]}x{labels.shape[0]}; {SKIP_HINT}",
                    path,
                    SIZE_MISMATCH,
                )
            labels[part] = index + 1
        if labels is None:
            raise SampleError(
                f"{pair.mask}: no part mask of face {pair.relative}; {SKIP_HINT}", pair.mask, MISSING
            )
        return labels

    def image_for(self, image: np.ndarray, mask: np.ndarray, pair: Pair) -> np.ndarray:
        """The photo at its masks' size: reduced (INTER_AREA) when it is a larger copy of their shape."""
        if reducible(image.shape[:2], mask.shape[:2], pair):
            return resize_to(image, mask.shape[:2], INTERPOLATIONS["area"])
        return image

    def inspect_headers(self, index: int) -> dict[str, Any]:
        pair = self.pairs[index]
        report = empty_report(pair.relative)
        sizes = []
        for what, path in [("image", pair.image)] + [("part mask", p) for _, p in self._parts(pair)]:
            try:
                sizes.append((path, header(path, what)[0]))
            except SampleError as err:
                report["problems"].append((err.kind, str(err)))
        images = [size for path, size in sizes if path == pair.image]
        parts = [(path, size) for path, size in sizes if path != pair.image]
        report["image_size"] = images[0] if images else None
        if parts:
            report["mask_size"] = parts[0][1]
            for path, size in parts[1:]:
                if size != parts[0][1]:
                    report["problems"].append(
                        (
                            SIZE_MISMATCH,
                            f"{path}: part mask is {size[0]}x{size[1]} but {parts[0][0]} is "
                            f"{parts[0][1][0]}x{parts[0][1][1]}; {SKIP_HINT}",
                        )
                    )
        if images and parts:
            try:
                reducible(_shape(images[0]).shape[:2], _shape(parts[0][1]).shape[:2], pair)
            except SampleError as err:
                report["problems"].append((err.kind, str(err)))
        return report

    @property
    def class_names(self) -> list[str]:
        return list(CLASS_NAMES)
