"""Any image/mask folder pair (your own labels, or a benchmark in a layout of your own).

`PairedSegmentation` is the one loader behind `data=folder`, `data=sflckr` and the benchmark presets
(segldm/data/ade20k.py, cocostuff.py, cityscapes.py, celebamask_hq.py): it checks every pair (and
instance map) exists when built (so a missing mask fails before training, not at step 90,000),
decodes each file fully, refuses mask/image size mismatches and labels outside [0, n_labels) other
than the ignore label, and resizes and crops image, labels and instances together: taming's rule by
default (smaller side -> size, centre or random crop), or a window of another aspect, a larger
load size before the crop, a stretch to the window (SPADE's rules); plus an optional joint
horizontal flip. With `on_error="skip"` a bad sample is dropped from its batch, logged and counted.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from segldm.data.resumable import AugmentationRandomState
from segldm.data.transforms import (
    FITS,
    INSTANCE_MODES,
    INTERPOLATIONS,
    MISSING,
    PIL_INTERPOLATIONS,
    SIZE_MISMATCH,
    SKIP_HINT,
    LabelRemap,
    SampleError,
    SkippedSample,
    check_instance_mode,
    check_on_error,
    check_same_size,
    crop_offsets,
    fit_size,
    header,
    label_dtype,
    label_map_tensor,
    load_image,
    load_instances,
    load_mask,
    one_hot,
    out_of_range,
    prepare_labels,
    resize_to,
    to_model_range,
)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
INSTANCE_MAP_KEY = "instance_map"  # sample key of the (H, W) int32 instance ids (with instance_edges)


@dataclass(frozen=True)
class Pair:
    """One sample's files; `relative` is what the reference calls `relative_file_path_`.

    `instance`: its instance-id map, where the dataset has them (read with `instance_edges`).
    """

    relative: str
    image: Path
    mask: Path
    instance: Path | None = None


def empty_report(relative: str) -> dict[str, Any]:
    """What `inspect` / `inspect_headers` fill in for one sample."""
    return {
        "relative": relative,
        "problems": [],
        "histogram": None,
        "ignored": 0,
        "out_of_range": [],
        "image_size": None,
        "mask_size": None,
    }


def _shape(size: tuple[int, int]) -> np.ndarray:
    """An empty array of (height, width) for `check_same_size` (one place for that rule and message)."""
    return np.empty((size[1], size[0], 0), dtype=np.uint8)


def pair_headers(
    pair: Pair, instance_modes: tuple[str, ...] | None = None, instance_expected: str = "an integer id map"
) -> dict[str, Any]:
    """Header-level check of one pair (no pixel decoded): the files open, the image, mask and (with
    `instance_modes`) instance map agree in size, the instance map's mode is one of `instance_modes`."""
    report = empty_report(pair.relative)
    files = [("image", pair.image), ("mask", pair.mask)]
    if instance_modes is not None and pair.instance is not None:
        files.append(("instance map", pair.instance))
    sizes: dict[str, tuple[int, int]] = {}
    for what, path in files:
        try:
            sizes[what], mode = header(path, what)
            if what == "instance map":
                check_instance_mode(mode, path, instance_modes or INSTANCE_MODES, instance_expected)
        except SampleError as err:
            report["problems"].append((err.kind, str(err)))
    report["image_size"], report["mask_size"] = sizes.get("image"), sizes.get("mask")
    if "image" in sizes and "mask" in sizes:
        try:
            check_same_size(_shape(sizes["image"]), _shape(sizes["mask"]), pair.image, pair.mask)
        except SampleError as err:
            report["problems"].append((err.kind, str(err)))
    if "mask" in sizes and "instance map" in sizes and sizes["mask"] != sizes["instance map"]:
        report["problems"].append(instance_size_error(pair, sizes["mask"], sizes["instance map"]))
    return report


def instance_size_error(pair: Pair, mask: tuple[int, int], instance: tuple[int, int]) -> tuple[str, str]:
    return (
        SIZE_MISMATCH,
        f"{pair.instance}: instance map is {instance[0]}x{instance[1]} but its mask {pair.mask} is "
        f"{mask[0]}x{mask[1]} (width x height); {SKIP_HINT}",
    )


class PairedSegmentation(AugmentationRandomState, Dataset):
    """Image/label-map pairs -> samples in the reference (taming `SegmentationBase`) format.

    Sample keys: `image` (H, W, 3) float32 in [-1, 1]; `label_map` (H, W) uint8 (int16 when ids or
    the ignore label exceed 255); with `one_hot`, `segmentation` (H, W, n_labels) float32 as the
    reference (ignore pixels all-zero); with `instance_edges`, `instance_map` (H, W) int32 (resized
    nearest, cropped and flipped with the labels); `relative_file_path_`, `file_path_`,
    `segmentation_path_`.

    Geometry (with `size`; None: every sample at its native size, flips only): the output window is
    `size` high and round(size * aspect) wide. The arrays are first resized to a window `load_scale`
    times larger (SPADE's load_size 286 for a 256 crop: 286/256) by `fit` (`cover`: keep the aspect
    and cover it, for a square window exactly taming's SmallestMaxSize; `stretch`: resize to it,
    aspect ignored), then cropped to the output window (random or centre).
    """

    # the instance-map modes this dataset accepts, and how errors describe them
    instance_modes: tuple[str, ...] = INSTANCE_MODES
    instance_expected: str = "an integer id map (mode L, I;16 or I)"

    def __init__(
        self,
        pairs: Sequence[Pair],
        *,
        n_labels: int,
        size: int | None = None,
        random_crop: bool = False,
        flip: bool = False,
        ignore_label: int | None = None,
        label_remap: Mapping[Any, Any] | Sequence[Any] | LabelRemap | None = None,
        interpolation: str = "bicubic",
        one_hot: bool = True,
        on_error: str = "raise",
        name: str = "dataset",
        aspect: float = 1.0,
        load_scale: float = 1.0,
        fit: str = "cover",
        instance_edges: bool = False,
    ) -> None:
        if n_labels <= 0:
            raise ValueError(f"{name}: data.n_labels must be positive, got {n_labels}")
        if interpolation not in INTERPOLATIONS and interpolation not in PIL_INTERPOLATIONS:
            raise ValueError(
                f"{name}: interpolation={interpolation!r} is not one of "
                f"{sorted(INTERPOLATIONS) + sorted(PIL_INTERPOLATIONS)}"
            )
        if fit not in FITS:
            raise ValueError(f"{name}: data.fit={fit!r} is not one of {list(FITS)}")
        if not aspect > 0 or not load_scale >= 1:
            raise ValueError(
                f"{name}: data.aspect={aspect} must be > 0 and data.load_scale={load_scale} >= 1 (the load "
                "window is never smaller than the crop)"
            )
        self.name = name
        self.n_labels = int(n_labels)
        self.size = int(size) if size is not None and size > 0 else None
        self.aspect = float(aspect)
        self.load_scale = float(load_scale)
        self.fit = fit
        self.instance_edges = bool(instance_edges)
        self.random_crop = random_crop
        self.flip = flip
        self.ignore_label = None if ignore_label is None else int(ignore_label)
        self.dtype = label_dtype(self.n_labels, self.ignore_label)
        if label_remap is None or isinstance(label_remap, LabelRemap):
            self.remap = label_remap
        else:
            self.remap = LabelRemap(label_remap, self.n_labels, self.ignore_label)
        self.interpolation: int | str = INTERPOLATIONS.get(interpolation, interpolation)
        self.one_hot = one_hot
        self.on_error = check_on_error(on_error)
        self.skipped: list[str] = []  # problems found while building (skip mode), in this process
        pairs = list(pairs)
        if self.instance_edges and any(pair.instance is None for pair in pairs):
            raise ValueError(
                f"{name}: data.instance_edges=true but this dataset has no instance maps; set "
                "data.instance_edges=false"
            )
        self.pairs = self._keep_complete(pairs)

    # ------------------------------------------------------------------ building
    def files_of(self, pair: Pair) -> list[tuple[str, Path]]:
        """The files a sample needs, as (what, path): image, mask, and its instance map when read."""
        files = [("image", pair.image), ("mask", pair.mask)]
        if self.instance_edges and pair.instance is not None:
            files.append(("instance map", pair.instance))
        return files

    def _keep_complete(self, pairs: list[Pair]) -> list[Pair]:
        """Every file of every sample must exist; raise naming them, or drop them (skip mode)."""
        if not pairs:
            raise ValueError(f"{self.name}: no samples found")
        missing = []
        for pair in pairs:
            absent = [(what, path) for what, path in self.files_of(pair) if not path.is_file()]
            if any(what in ("image", "mask") for what, _ in absent):  # its other files do not matter then
                absent = [(what, path) for what, path in absent if what in ("image", "mask")]
            missing += [(pair, what, path) for what, path in absent]
        if not missing:
            return pairs
        lines = [f"{path} ({what} of {pair.relative})" for pair, what, path in missing]
        if self.on_error == "raise":
            shown = "\n  ".join(lines[:10])
            more = f"\n  ... and {len(lines) - 10} more" if len(lines) > 10 else ""
            counts = {}
            for _, what, _ in missing:
                counts[what] = counts.get(what, 0) + 1
            by_kind = ", ".join(
                f"{n} {what}{'s' if n > 1 and not what.endswith('s') else ''}" for what, n in counts.items()
            )
            raise SampleError(
                f"{self.name}: {len(missing)} file(s) missing:\n  {shown}{more}\n({by_kind} missing) {SKIP_HINT}",
                missing[0][2],
                MISSING,
            )
        self.skipped.extend(f"missing {line}" for line in lines)
        log.warning(
            "%s: skipping %d of %d samples with missing files (data.on_error=skip), first: %s",
            self.name,
            len({pair for pair, _, _ in missing}),
            len(pairs),
            lines[0],
        )
        bad = {pair for pair, _, _ in missing}
        kept = [pair for pair in pairs if pair not in bad]
        if not kept:
            raise ValueError(f"{self.name}: every sample has a missing file (first: {lines[0]})")
        return kept

    # ------------------------------------------------------------------ loading
    def __len__(self) -> int:
        return len(self.pairs)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Full size (image uint8 H x W x 3, labels H x W in `self.dtype`, instance ids H x W int32 or
        None without `instance_edges`) after every check."""
        pair = self.pairs[index]
        image = load_image(pair.image)
        mask = self.load_labels(pair)
        image = self.image_for(image, mask, pair)
        labels = prepare_labels(mask, self.n_labels, self.ignore_label, self.remap, pair.mask, self.dtype)
        return image, labels, self.read_instances(pair, labels)

    def read_instances(self, pair: Pair, labels: np.ndarray) -> np.ndarray | None:
        """The pair's instance ids (int32, the labels' size), or None without `instance_edges`."""
        if not self.instance_edges or pair.instance is None:
            return None
        instances = load_instances(pair.instance, self.instance_modes, self.instance_expected)
        if instances.shape != labels.shape:
            kind, message = instance_size_error(
                pair, (labels.shape[1], labels.shape[0]), (instances.shape[1], instances.shape[0])
            )
            raise SampleError(message, pair.instance, kind)
        return instances

    @property
    def crop_width(self) -> int | None:
        return None if self.size is None else round(self.size * self.aspect)

    def transform(
        self, image: np.ndarray, labels: np.ndarray, instances: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Resize (image by `interpolation`, labels and instances nearest: PIL's beside a PIL image filter,
        as SPADE, else OpenCV's), joint crop, joint flip."""
        maps = [labels] if instances is None else [labels, instances]
        if self.size is not None:
            crop_h, crop_w = self.size, self.crop_width
            load_h = round(crop_h * self.load_scale)
            load_w = round(crop_w * self.load_scale)
            new = fit_size(image.shape[0], image.shape[1], load_h, load_w, self.fit)
            image = resize_to(image, new, self.interpolation)
            nearest = "pil_nearest" if isinstance(self.interpolation, str) else INTERPOLATIONS["nearest"]
            maps = [resize_to(m, new, nearest) for m in maps]
            y, x = crop_offsets(image.shape[0], image.shape[1], crop_h, self.random_crop, crop_w)
            image = image[y : y + crop_h, x : x + crop_w]
            maps = [m[y : y + crop_h, x : x + crop_w] for m in maps]
        if self.flip and random.random() < 0.5:
            image, maps = image[:, ::-1], [m[:, ::-1] for m in maps]
        image, maps = np.ascontiguousarray(image), [np.ascontiguousarray(m) for m in maps]
        return image, maps[0], (maps[1] if len(maps) > 1 else None)

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:
        try:
            image, labels, instances = self.read(index)
        except SampleError as err:
            if self.on_error == "raise":
                raise
            # logged and counted once per batch by the data module (in the main process)
            log.debug("%s: skipping sample %d (data.on_error=skip): %s", self.name, index, err)
            return SkippedSample(str(err))
        image, labels, instances = self.transform(image, labels, instances)
        pair = self.pairs[index]
        sample: dict[str, Any] = {
            "image": torch.from_numpy(to_model_range(image)),
            "label_map": label_map_tensor(labels),
            "relative_file_path_": pair.relative,
            "file_path_": str(pair.image),
            "segmentation_path_": str(pair.mask),
        }
        if instances is not None:
            sample[INSTANCE_MAP_KEY] = torch.from_numpy(instances)
        if self.one_hot:
            sample["segmentation"] = torch.from_numpy(one_hot(labels, self.n_labels, self.ignore_label))
        return sample

    # ------------------------------------------------------------------ checking
    def inspect(self, index: int) -> dict[str, Any]:
        """Read one pair at full size and report instead of raising (for `segldm.data.check`).

        Returns the sizes, every problem as (kind, message), a histogram of valid labels, the count
        of ignore pixels and the out-of-range ids found.
        """
        pair = self.pairs[index]
        report = empty_report(pair.relative)
        report["histogram"] = np.zeros(self.n_labels, dtype=np.int64)
        image = mask = None
        for what, loader, path in (("image", load_image, pair.image), ("mask", self.load_labels, pair)):
            try:
                array = loader(path)
            except SampleError as err:
                report["problems"].append((err.kind, str(err)))
                continue
            report[f"{what}_size"] = (array.shape[1], array.shape[0])
            if what == "image":
                image = array
            else:
                mask = array
        if mask is None:
            return report
        if image is not None:
            try:
                self.image_for(image, mask, pair)
            except SampleError as err:
                report["problems"].append((err.kind, str(err)))
        try:
            self.read_instances(pair, mask)
        except SampleError as err:
            report["problems"].append((err.kind, str(err)))
        try:
            labels = self.remap(mask, pair.mask) if self.remap is not None else mask
        except SampleError as err:
            report["problems"].append((err.kind, str(err)))
            return report
        bad = out_of_range(labels, self.n_labels, self.ignore_label)
        if bad.size:
            try:
                prepare_labels(labels, self.n_labels, self.ignore_label, None, pair.mask, self.dtype)
            except SampleError as err:
                report["problems"].append((err.kind, str(err)))
            report["out_of_range"] = bad.tolist()
        flat = labels.reshape(-1).astype(np.int64)
        valid = (flat >= 0) & (flat < self.n_labels)
        if self.ignore_label is not None:
            ignored = flat == self.ignore_label
            report["ignored"] = int(ignored.sum())
            valid &= ~ignored
        report["histogram"] = np.bincount(flat[valid], minlength=self.n_labels)
        return report

    def load_labels(self, pair: Pair) -> np.ndarray:
        """The pair's stored label ids at full size (before the remap); `inspect` reads labels here."""
        return load_mask(pair.mask)

    def image_for(self, image: np.ndarray, mask: np.ndarray, pair: Pair) -> np.ndarray:
        """The image at its mask's size: here they must agree (a SampleError otherwise)."""
        check_same_size(image, mask, pair.image, pair.mask)
        return image

    def inspect_headers(self, index: int) -> dict[str, Any]:
        """`inspect` at header level (`segldm.data.check mode=headers`, `data.precheck=headers`)."""
        modes = self.instance_modes if self.instance_edges else None
        return pair_headers(self.pairs[index], modes, self.instance_expected)

    def unpaired_masks(self) -> list[Path]:
        """Mask files no sample uses (only meaningful when the pairs came from scanning folders)."""
        return []


def _resolve(root: Path, rel: str) -> Path:
    return root / rel  # an absolute `rel` stays absolute


def read_file_list(path: Path, name: str) -> list[str]:
    """Non-empty lines of a file list; '#' starts a comment line. Errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{name}: file list {path} does not exist")
    lines = [line.rstrip("\r\n") for line in path.read_text().splitlines()]
    entries = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not entries:
        raise ValueError(
            f"{name}: file list {path} is empty; it should hold one relative image path per line"
        )
    return entries


class FolderSegmentation(PairedSegmentation):
    """Images under `image_root`, label maps under `mask_root`, paired by relative path.

    Pairing: image `<key><image_suffix>` <-> mask `<key><mask_suffix>`; without `image_suffix` the
    key is the relative path minus its extension (COCO-Stuff, ADE20K, CelebAMask-HQ:
    `x.jpg` <-> `x.png`); Cityscapes sets `image_suffix=_leftImg8bit.png`,
    `mask_suffix=_gtFine_labelIds.png`. With `file_list`, only its entries are used: one image path
    per line (relative to `image_root`), or `image<TAB>mask` (mask relative to `mask_root`); a
    relative `file_list` path is taken from `root` (data.root) when given.
    """

    def __init__(
        self,
        image_root: str,
        mask_root: str,
        n_labels: int,
        file_list: str | None = None,
        *,
        root: str | None = None,
        size: int | None = 256,
        random_crop: bool = False,
        flip: bool = False,
        ignore_label: int | None = None,
        label_remap: Mapping[Any, Any] | Sequence[Any] | None = None,
        image_suffix: str | None = None,
        mask_suffix: str = ".png",
        image_extensions: Sequence[str] = IMAGE_EXTENSIONS,
        interpolation: str = "bicubic",
        one_hot: bool = True,
        on_error: str = "raise",
        name: str = "data=folder",
    ) -> None:
        self.image_root = Path(image_root)
        self.mask_root = Path(mask_root)
        self.image_suffix = image_suffix or None
        self.mask_suffix = mask_suffix
        self.image_extensions = tuple(e.lower() for e in image_extensions)
        self.file_list = None if file_list in (None, "") else Path(file_list)
        if self.file_list is not None and root is not None and not self.file_list.is_absolute():
            self.file_list = Path(root) / self.file_list
        for what, root in (("image", self.image_root), ("mask", self.mask_root)):
            if not root.is_dir():
                raise FileNotFoundError(
                    f"{name}: {what} folder {root} does not exist; point data.root at your data, or set the "
                    "split's folders (data=folder: data.train_images, data.train_masks, data.val_images, "
                    "data.val_masks)"
                )
        pairs = self._list_pairs(name) if self.file_list is not None else self._scan_pairs(name)
        super().__init__(
            pairs,
            n_labels=n_labels,
            size=size,
            random_crop=random_crop,
            flip=flip,
            ignore_label=ignore_label,
            label_remap=label_remap,
            interpolation=interpolation,
            one_hot=one_hot,
            on_error=on_error,
            name=name,
        )

    def _mask_for(self, relative: str) -> Path:
        if self.image_suffix is not None:
            key = relative[: -len(self.image_suffix)] if relative.endswith(self.image_suffix) else relative
        else:
            key = str(Path(relative).with_suffix(""))
        return self.mask_root / f"{key}{self.mask_suffix}"

    def _is_image(self, path: Path) -> bool:
        if not path.is_file() or path.suffix.lower() not in self.image_extensions:
            return False
        return self.image_suffix is None or path.name.endswith(self.image_suffix)

    def _scan_pairs(self, name: str) -> list[Pair]:
        images = sorted(p for p in self.image_root.rglob("*") if self._is_image(p))
        if not images:
            raise ValueError(
                f"{name}: no images ({', '.join(self.image_extensions)}"
                f"{'; name ending ' + self.image_suffix if self.image_suffix else ''}) under {self.image_root}"
            )
        pairs = []
        for path in images:
            relative = path.relative_to(self.image_root).as_posix()
            pairs.append(Pair(relative, path, self._mask_for(relative)))
        return pairs

    def _list_pairs(self, name: str) -> list[Pair]:
        assert self.file_list is not None
        pairs = []
        for entry in read_file_list(self.file_list, name):
            if "\t" in entry:
                fields = [f.strip() for f in entry.split("\t") if f.strip()]
            elif _resolve(self.image_root, entry).exists():
                fields = [entry]
            else:
                fields = entry.split()
            if len(fields) == 1:
                pairs.append(Pair(fields[0], _resolve(self.image_root, fields[0]), self._mask_for(fields[0])))
            elif len(fields) == 2:
                image, mask = fields
                pairs.append(Pair(image, _resolve(self.image_root, image), _resolve(self.mask_root, mask)))
            else:
                raise ValueError(
                    f"{name}: file list {self.file_list} line {entry!r} has {len(fields)} fields; "
                    "expected an image path, or image<TAB>mask"
                )
        return pairs

    def unpaired_masks(self) -> list[Path]:
        """Masks under `mask_root` that no image pairs with (scanned folders only)."""
        if self.file_list is not None:
            return []
        used = {pair.mask for pair in self.pairs}
        pattern = f"*{self.mask_suffix}"
        return sorted(p for p in self.mask_root.rglob(pattern) if p.is_file() and p not in used)
