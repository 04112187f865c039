"""Shared file loading, label handling, resize/crop/flip and collation for the file-backed datasets.

One implementation behind `data=sflckr` and `data=folder`, written to reproduce taming's
`SegmentationBase` (albumentations 0.4 `SmallestMaxSize` with OpenCV interpolation, then a joint
centre or random crop) and to refuse any input that would otherwise turn into a wrong label or a
crash deep into a run: every problem becomes a `SampleError` that names the file and the way out.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from torch.utils.data import default_collate

# As albumentations does on import: OpenCV's own thread pool inside every DataLoader worker
# oversubscribes the cores; resize results do not depend on it.
cv2.setNumThreads(0)

INTERPOLATIONS: dict[str, int] = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}
# PIL's filters widen with the scale (antialiased downsampling): what SPADE, OASIS and SDM resize
# images with (Image.BICUBIC); the benchmark presets use it, data=sflckr/folder keep OpenCV's.
PIL_INTERPOLATIONS: dict[str, int] = {
    "pil_nearest": Image.Resampling.NEAREST,  # label and instance maps beside a pil_* image resize
    "pil_bicubic": Image.Resampling.BICUBIC,
    "pil_bilinear": Image.Resampling.BILINEAR,
    "pil_lanczos": Image.Resampling.LANCZOS,
}
FITS = ("cover", "stretch")  # resize before the crop: keep the aspect and cover the window, or stretch to it
ON_ERROR_MODES = ("raise", "skip")
SKIP_HINT = "fix or remove the file, or set data.on_error=skip to skip such samples (logged and counted)"
SKIPPED_KEY = "skipped_"  # batch key listing the samples a skipping collate dropped

# SampleError kinds, counted separately by `python -m segldm.data.check`.
MISSING = "missing file"
UNREADABLE = "unreadable file"
SIZE_MISMATCH = "size mismatch"
OUT_OF_RANGE = "label out of range"


class SampleError(RuntimeError):
    """One sample cannot be used; the message names the file, the problem and what to do.

    Constructible from the message alone, so a DataLoader worker can re-raise it in the main process.
    """

    def __init__(self, message: str, path: str | Path | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.kind = kind


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR_MODES:
        raise ValueError(f"data.on_error={on_error!r} is not supported; expected one of {ON_ERROR_MODES}")
    return on_error


# ---------------------------------------------------------------------------- files
@contextmanager
def _strict_decoding():
    """Decode with PIL's truncation check on, whatever another library set globally."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def open_fully(path: Path, what: str) -> Image.Image:
    """Open and decode the whole file now, so a truncated or corrupt file fails here, named."""
    if not path.is_file():
        raise SampleError(f"{path}: {what} file is missing; {SKIP_HINT}", path, MISSING)
    try:
        with _strict_decoding():
            image = Image.open(path)
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise SampleError(
            f"{path}: {what} file is corrupt or truncated, it cannot be decoded "
            f"({type(err).__name__}: {err}); {SKIP_HINT}",
            path,
            UNREADABLE,
        ) from err
    return image


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def header(path: Path, what: str) -> tuple[tuple[int, int], str]:
    """((width, height), mode) from the file's header only (PIL's lazy open: no pixel is decoded)."""
    try:
        with Image.open(path) as image:
            return image.size, image.mode
    except FileNotFoundError as err:
        raise SampleError(f"{path}: {what} file is missing; {SKIP_HINT}", path, MISSING) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise SampleError(
            f"{path}: {what} file is corrupt, its header cannot be decoded "
            f"({type(err).__name__}: {err}); {SKIP_HINT}",
            path,
            UNREADABLE,
        ) from err


def header_size(path: Path, what: str) -> tuple[int, int]:
    """(width, height) from the file's header only."""
    return header(path, what)[0]


def load_image(path: Path) -> np.ndarray:
    """Any PIL image (grey, palette, RGBA, CMYK, 16-bit grey) -> (H, W, 3) uint8 RGB.

    16-bit greyscale is scaled to 8 bits (PIL's own conversion would clip it to 255).
    """
    image = open_fully(path, "image")
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(image).astype(np.float64)
        grey = np.clip(np.round(grey / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode == "F":
        raise SampleError(
            f"{path}: image has floating-point mode 'F', which has no defined 8-bit range; save it as 8-bit RGB",
            path,
            UNREADABLE,
        )
    if image.mode != "RGB":
        image = image.convert("RGB")  # RGBA: alpha dropped; P/L/LA/CMYK/YCbCr: converted
    return np.asarray(image, dtype=np.uint8)


def load_mask(path: Path) -> np.ndarray:
    """A label map -> (H, W) integer array of the stored label ids.

    Modes L and P (palette indices are the labels), 1 (0/1), I;16 and I (16/32-bit ids) are read
    as stored. LA/RGB/RGBA are accepted only when every channel carries the same grey value;
    colour-coded masks are refused rather than guessed at.
    """
    mask = open_fully(path, "mask")
    mode = mask.mode
    if mode in ("L", "P", "I") or mode.startswith("I;16"):
        return np.asarray(mask)
    if mode == "1":
        return np.asarray(mask, dtype=np.uint8)
    if mode in ("LA", "PA"):
        return np.asarray(mask)[..., 0]
    if mode in ("RGB", "RGBA"):
        rgb = np.asarray(mask)[..., :3]
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all():
            return rgb[..., 0]
        raise SampleError(
            f"{path}: mask is a colour-coded {mode} image; convert it to a label map (mode L, P or I;16 with one "
            "label id per pixel) before training",
            path,
            UNREADABLE,
        )
    raise SampleError(
        f"{path}: mask mode {mode!r} is not a label map; save it as mode L, P or I;16", path, UNREADABLE
    )


# Instance maps: one integer id per object (Cityscapes *_instanceIds.png: class id x 1000 + k, 16 bit;
# SPADE's COCO maps: 8 bit). Colour or palette files are refused: they are not instance ids.
INSTANCE_MODES = ("L", "I", "I;16", "I;16L", "I;16B", "I;16N")


def check_instance_mode(mode: str, path: Path, modes: Sequence[str], expected: str) -> None:
    if mode not in modes:
        raise SampleError(
            f"{path}: instance map has mode {mode!r}, not {expected}; it is not an instance-id file (a colour or "
            f"label file in its place?) - use the dataset's instance maps, or set data.instance_edges=false",
            path,
            UNREADABLE,
        )


def load_instances(
    path: Path, modes: Sequence[str] = INSTANCE_MODES, expected: str = "an integer id map"
) -> np.ndarray:
    """An instance-id map -> (H, W) int32, refusing any mode not in `modes` (named in the error)."""
    image = open_fully(path, "instance map")
    check_instance_mode(image.mode, path, modes, expected)
    return np.asarray(image).astype(np.int32)


def check_same_size(image: np.ndarray, mask: np.ndarray, image_path: Path, mask_path: Path) -> None:
    if image.shape[:2] != mask.shape[:2]:
        (ih, iw), (mh, mw) = image.shape[:2], mask.shape[:2]
        raise SampleError(
            f"{mask_path}: mask is {mw}x{mh} but its image {image_path} is {iw}x{ih} (width x height); masks are "
            f"never resized to fit, {SKIP_HINT}",
            mask_path,
            SIZE_MISMATCH,
        )


# ---------------------------------------------------------------------------- labels
def label_dtype(n_labels: int, ignore_label: int | None) -> np.dtype:
    """The smallest dtype holding every label id and the ignore label: uint8, else int16."""
    values = [0, n_labels - 1] + ([] if ignore_label is None else [ignore_label])
    if min(values) >= 0 and max(values) <= 255:
        return np.dtype(np.uint8)
    if min(values) >= -32768 and max(values) <= 32767:
        return np.dtype(np.int16)
    raise ValueError(
        f"data.n_labels={n_labels} / data.ignore_label={ignore_label} do not fit a 16-bit label map; "
        "use ids within [-32768, 32767]"
    )


class LabelRemap:
    """Stored label id -> training label id (e.g. Cityscapes ids -> train ids).

    A list maps id i to list[i]; an id beyond the list is an error. A dict maps its keys and leaves
    every other id as it is (then range-checked like any label).
    """

    def __init__(
        self, remap: Mapping[Any, Any] | Sequence[Any], n_labels: int, ignore_label: int | None
    ) -> None:
        if isinstance(remap, Mapping):
            pairs = {int(k): int(v) for k, v in remap.items()}
            self.strict = False
        elif isinstance(remap, Sequence) and not isinstance(remap, str):
            pairs = {i: int(v) for i, v in enumerate(remap)}
            self.strict = True
        else:
            raise ValueError(f"data.label_remap must be a dict or a list of ints, got {type(remap).__name__}")
        if not pairs:
            raise ValueError("data.label_remap is empty; use null for no remapping")
        bad_src = sorted(k for k in pairs if k < 0)
        if bad_src:
            raise ValueError(f"data.label_remap: source ids must be >= 0, got {bad_src}")
        bad_dst = sorted(
            {
                v
                for v in pairs.values()
                if not (0 <= v < n_labels or (ignore_label is not None and v == ignore_label))
            }
        )
        if bad_dst:
            raise ValueError(
                f"data.label_remap maps to {bad_dst}, outside [0, data.n_labels={n_labels}) and not "
                f"data.ignore_label={ignore_label}"
            )
        self.table = np.arange(max(pairs) + 1, dtype=np.int64)
        for src, dst in pairs.items():
            self.table[src] = dst

    def __call__(self, labels: np.ndarray, path: Path) -> np.ndarray:
        size = len(self.table)
        lo, hi = int(labels.min()), int(labels.max())
        if lo >= 0 and hi < size:
            return self.table[labels]
        if self.strict:
            outside = np.unique(labels[(labels < 0) | (labels >= size)])
            raise SampleError(
                f"{path}: label ids {_few(outside)} have no entry in data.label_remap (a list of {size}); "
                f"extend the list or {SKIP_HINT}",
                path,
                OUT_OF_RANGE,
            )
        inside = (labels >= 0) & (labels < size)
        return np.where(inside, self.table[np.where(inside, labels, 0)], labels)


def _few(values: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def prepare_labels(
    mask: np.ndarray,
    n_labels: int,
    ignore_label: int | None,
    remap: LabelRemap | None,
    path: Path,
    dtype: np.dtype,
) -> np.ndarray:
    """Remap, then require every id in [0, n_labels) or == ignore_label; cast to `dtype`."""
    labels = remap(mask, path) if remap is not None else mask
    bad = out_of_range(labels, n_labels, ignore_label)
    if bad.size:
        counts = [(int(v), int((labels == v).sum())) for v in bad[:10]]
        detail = ", ".join(f"{v} ({c} px)" for v, c in counts)
        raise SampleError(
            f"{path}: label ids {detail}{', ...' if len(bad) > 10 else ''} are outside [0, data.n_labels={n_labels}) "
            f"and not data.ignore_label={ignore_label}; set data.n_labels / data.ignore_label / data.label_remap "
            f"to match this dataset, or {SKIP_HINT}",
            path,
            OUT_OF_RANGE,
        )
    return labels.astype(dtype, copy=False)


def out_of_range(labels: np.ndarray, n_labels: int, ignore_label: int | None) -> np.ndarray:
    """Sorted distinct ids outside [0, n_labels) other than the ignore label (empty if none)."""
    if labels.size == 0 or (int(labels.min()) >= 0 and int(labels.max()) < n_labels):
        return np.empty(0, dtype=np.int64)
    values = np.unique(labels[(labels < 0) | (labels >= n_labels)]).astype(np.int64)
    if ignore_label is not None:
        values = values[values != ignore_label]
    return values


def one_hot(labels: np.ndarray, n_labels: int, ignore_label: int | None = None) -> np.ndarray:
    """(H, W) ids -> (H, W, n_labels) float32 one-hot; ignore pixels get an all-zero vector."""
    out = np.zeros((*labels.shape, n_labels), dtype=np.float32)
    ids = labels.astype(np.int64)
    valid = (ids >= 0) & (ids < n_labels)
    if ignore_label is not None:
        valid &= ids != ignore_label
    rows, cols = np.nonzero(valid)
    out[rows, cols, ids[rows, cols]] = 1.0
    return out


# ---------------------------------------------------------------------------- geometry
def smallest_side_size(height: int, width: int, size: int) -> tuple[int, int] | None:
    """albumentations 0.4 `SmallestMaxSize`: (new_h, new_w), or None when scale == 1 (no resize).

    Python's round (half to even: 50.5 -> 50) is the rule the reference used.
    """
    scale = size / min(height, width)
    if scale == 1:
        return None
    return round(height * scale), round(width * scale)


def resize_smallest_side(array: np.ndarray, size: int, interpolation: int) -> np.ndarray:
    """Scale so the smaller side is `size` with OpenCV (as the reference); arrays are H x W [x C]."""
    new = smallest_side_size(array.shape[0], array.shape[1], size)
    if new is None:
        return array
    return cv2.resize(array, (new[1], new[0]), interpolation=interpolation)


def crop_offsets(
    height: int, width: int, size: int, random_crop: bool, crop_width: int | None = None
) -> tuple[int, int]:
    """(y, x) of a size x crop_width window (square without crop_width): centre as albumentations
    CenterCrop, or RandomCrop's rule.

    The random draw uses Python's `random`, which DataLoader seeds differently in every worker.
    """
    crop_width = size if crop_width is None else crop_width
    if height < size or width < crop_width:
        raise ValueError(f"cannot crop {crop_width}x{size} from {width}x{height}")
    if random_crop:
        h_start, w_start = random.random(), random.random()
        return int((height - size) * h_start), int((width - crop_width) * w_start)
    return (height - size) // 2, (width - crop_width) // 2


def fit_size(height: int, width: int, out_height: int, out_width: int, fit: str) -> tuple[int, int] | None:
    """The (height, width) an array is resized to before its crop; None: no resize.

    `cover` keeps the aspect and scales until the out_height x out_width window is covered (for a
    square window exactly `SmallestMaxSize`, the reference rule); `stretch` resizes to the window
    itself, aspect ignored (SPADE's `resize_and_crop` / `fixed`).
    """
    if fit not in FITS:
        raise ValueError(f"fit={fit!r} is not one of {FITS}")
    if fit == "stretch":
        return None if (height, width) == (out_height, out_width) else (out_height, out_width)
    if out_height == out_width:
        return smallest_side_size(height, width, out_height)
    scale = max(out_height / height, out_width / width)
    if scale == 1:
        return None
    return max(out_height, round(height * scale)), max(out_width, round(width * scale))


def resize_to(array: np.ndarray, size: tuple[int, int] | None, interpolation: int | str) -> np.ndarray:
    """Resize an H x W [x C] array to size=(height, width) (None: unchanged) with an OpenCV flag or a
    `PIL_INTERPOLATIONS` name (PIL: uint8 images; id maps of any integer type with `pil_nearest`)."""
    if size is None or tuple(array.shape[:2]) == tuple(size):
        return array
    height, width = size
    if isinstance(interpolation, str):
        resample = PIL_INTERPOLATIONS[interpolation]
        if array.dtype == np.uint8:
            return np.asarray(Image.fromarray(array).resize((width, height), resample))
        ids = Image.fromarray(array.astype(np.int32)).resize((width, height), resample)  # mode I
        return np.asarray(ids).astype(array.dtype)
    return cv2.resize(array, (width, height), interpolation=interpolation)


def to_model_range(image: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1], computed as the reference does (float64, then cast)."""
    return (image / 127.5 - 1.0).astype(np.float32)


# ---------------------------------------------------------------------------- batches
def collate_samples(samples: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """default_collate over the samples that loaded; skipped ones (None) are listed, not filled in.

    A skipped sample is never replaced by another, so the other samples of the batch are exactly
    what they would have been. With any skipped, the batch carries `skipped_` (their descriptions);
    a batch whose samples were all skipped holds only that key (the data module turns it into None,
    which Lightning skips).
    """
    kept = [s for s in samples if s is not None and not isinstance(s, SkippedSample)]
    skipped = [str(s) for s in samples if isinstance(s, SkippedSample)]
    skipped += ["unknown sample (dataset returned None)" for s in samples if s is None]
    batch: dict[str, Any] = default_collate(kept) if kept else {}
    if skipped:
        batch[SKIPPED_KEY] = skipped
    return batch


class SkippedSample(str):
    """What a dataset with on_error=skip returns for a bad sample: the error message, as a str."""


def label_map_tensor(labels: np.ndarray) -> torch.Tensor:
    """A contiguous, writable integer label map (uint8 or int16) as a tensor, without widening it."""
    labels = np.ascontiguousarray(labels)
    return torch.from_numpy(labels if labels.flags.writeable else labels.copy())
