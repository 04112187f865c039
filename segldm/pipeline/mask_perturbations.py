"""Perturbed masks for robustness evaluation: what a model draws from a mask that is coarse, off at its
boundaries or partly wrong, scored against the clean mask (``eval.mask_perturbation``, docs/evaluation.md).

Each perturbation is a small pure function of an integer label map (numpy int64 (H, W) -> (H, W)) and,
where it is random, of a generator; :class:`MaskPerturbation` wraps one behind the interface eval uses:
``perturbation(labels, index, space)`` draws from ``numpy.random.default_rng([seed, index])`` (the same
mask index always gets the same perturbation, whatever N or batch size), leaves the dataset's ignore
(don't-care) pixels as they are, and :meth:`MaskPerturbation.card` says what was done (name, params,
seed) for metrics.json and the protocol card.

The reference is SCDM's noisy-mask benchmark (Ko et al., ICML 2024), mlvlab/SCDM@dd176a177716a597b1aeac3d120ac9488821a661,
three noisy copies of the ADE20K validation labels:

- **DS** (``image_process/downsample.py``): every annotation resized to 64x64 with PIL NEAREST
  (L72-76, L82-83), read back at 256 by the loader's NEAREST resize (``guided_diffusion/
  image_datasets.py`` L212): :class:`Downsample` (``factor=4`` is 256 -> 64).
- **Edge** (``image_process/edge.py``): pixels that differ from a 4-neighbour (``get_edges``, L9-15),
  grown by L1 radius 2 (L51-56), become label 0, ADE20K's "other"/unlabeled (L61-63): :class:`BoundaryDrop`.
- **Random** (``image_process/random.py``): every pixel independently with probability 0.1 (L130-135)
  becomes label 0 (L138-140): :class:`PixelDrop`.

SCDM's "label 0" is ADE20K's unlabeled id; here ``fill="ignore"`` is the dataset's ignore label (an
all-zero condition vector), ``fill=<id>`` a class id (ADE20K with ``data.ignore_label=null``: 0, as
SCDM), ``fill="random"`` a random other class per pixel (data without an ignore label, like the
built-in scenes). SCDM's Edge takes boundaries from the instance map where the loader has one
(edge.py L40-42) and ADE20K's loader has none (image_datasets.py L50-53): here they come from the
label map. Instance maps are not perturbed (SCDM rewrote only the label PNGs, edge.py L64-66).

Beyond SCDM: :class:`Erode` / :class:`Dilate` (masks drawn too tight or too loose around objects of
chosen classes) and :class:`SwapRegions` (a share of connected regions given a wrong class).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from scipy import ndimage  # scipy comes with pytorch-fid (a segldm dependency)

SCDM = "mlvlab/SCDM@dd176a177716a597b1aeac3d120ac9488821a661"
FILLS = ("ignore", "random")


@dataclass(frozen=True)
class LabelSpace:
    """The labels a perturbed mask may hold: ids 0..n_labels-1 and the ignore label (None: none)."""

    n_labels: int
    ignore_label: int | None = None


# ------------------------------------------------------------------------------ pure functions
def label_edges(labels: np.ndarray) -> np.ndarray:
    """Pixels that differ from one of their 4 neighbours (both sides of every boundary), as SCDM's
    ``get_edges`` (image_process/edge.py L9-15)."""
    edge = np.zeros(labels.shape, dtype=bool)
    horizontal = labels[:, 1:] != labels[:, :-1]
    vertical = labels[1:, :] != labels[:-1, :]
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    return edge


def boundary_band(labels: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within L1 distance ``radius`` of an edge pixel (SCDM's diamond, edge.py L51-56)."""
    edges = label_edges(labels)
    if radius <= 0 or not edges.any():
        return edges
    diamond = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_dilation(edges, structure=diamond, iterations=int(radius))


def fill_pixels(
    labels: np.ndarray, where: np.ndarray, fill: str | int, rng: np.random.Generator, space: LabelSpace
) -> np.ndarray:
    """``labels`` with the pixels of ``where`` set to ``fill``: ``"ignore"`` (the ignore label), an id,
    or ``"random"`` (a uniformly drawn id other than the pixel's own)."""
    out = labels.copy()
    if fill == "random":
        own = labels[where]
        drawn = rng.integers(0, space.n_labels - 1, size=own.shape)
        out[where] = drawn + (drawn >= own)  # skip the pixel's own id: uniform over the other n-1
    elif fill == "ignore":
        out[where] = space.ignore_label
    else:
        out[where] = int(fill)
    return out


def downsample_nearest(labels: np.ndarray, factor: int) -> np.ndarray:
    """Nearest down to (H // factor, W // factor), nearest back up, both as PIL's NEAREST resize picks
    (source index floor((i + 0.5) * in / out)): with H, W divisible by ``factor`` a block-constant map
    whose block (i, j) holds ``labels[i * f + f // 2, j * f + f // 2]``."""
    height, width = labels.shape

    def pick(n_in: int, n_out: int) -> np.ndarray:
        return np.floor((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64)

    small_h, small_w = max(1, height // factor), max(1, width // factor)
    small = labels[np.ix_(pick(height, small_h), pick(width, small_w))]
    return small[np.ix_(pick(small_h, height), pick(small_w, width))]


def near(mask: np.ndarray, k: int) -> np.ndarray:
    """Pixels within Chebyshev distance ``k`` of ``mask`` (a (2k+1)^2 square window)."""
    if k <= 0:
        return mask.copy()
    return ndimage.binary_dilation(mask, structure=np.ones((2 * k + 1, 2 * k + 1), dtype=bool))


def nearest_label(labels: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """Every pixel's label of its nearest (Euclidean) pixel of ``sources`` (``sources`` must not be empty)."""
    _, (rows, cols) = ndimage.distance_transform_edt(~sources, return_indices=True)
    return labels[rows, cols]


def erode(labels: np.ndarray, k: int, classes: Sequence[int], ignore_label: int | None = None) -> np.ndarray:
    """Regions of ``classes`` shrink by ``k`` pixels (square window: a pixel of class c within Chebyshev
    distance k of a pixel of another label is freed; the image border frees nothing). Freed pixels take
    the label of their nearest pixel outside ``classes`` (and not ignore): a square of a chosen class on
    a background loses k pixels on every side to the background."""
    chosen = np.isin(labels, list(classes))
    freed = np.zeros(labels.shape, dtype=bool)
    for c in np.unique(labels[chosen]):
        own = labels == c
        freed |= own & near(~own, k)
    sources = ~chosen if ignore_label is None else ~chosen & (labels != ignore_label)
    if not freed.any() or not sources.any():
        return labels.copy()
    out = labels.copy()
    out[freed] = nearest_label(labels, sources)[freed]
    return out


def dilate(labels: np.ndarray, k: int, classes: Sequence[int], ignore_label: int | None = None) -> np.ndarray:
    """Regions of ``classes`` grow by ``k`` pixels (square window): every other pixel (not ignore) within
    Chebyshev distance k of a chosen pixel takes the label of its nearest chosen pixel."""
    chosen = np.isin(labels, list(classes))
    if not chosen.any():
        return labels.copy()
    grown = near(chosen, k) & ~chosen
    if ignore_label is not None:
        grown &= labels != ignore_label
    out = labels.copy()
    out[grown] = nearest_label(labels, chosen)[grown]
    return out


def regions(labels: np.ndarray, ignore_label: int | None = None) -> tuple[np.ndarray, int]:
    """Connected regions of one label each (4-connectivity; ignore pixels are in none: 0), numbered 1..n."""
    out = np.zeros(labels.shape, dtype=np.int64)
    count = 0
    for value in np.unique(labels):
        if ignore_label is not None and value == ignore_label:
            continue
        components, n = ndimage.label(labels == value)
        out[components > 0] = components[components > 0] + count
        count += n
    return out, count


def round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def swap_regions(
    labels: np.ndarray, fraction: float, rng: np.random.Generator, space: LabelSpace
) -> tuple[np.ndarray, np.ndarray]:
    """round(fraction * n_regions) connected regions (drawn without replacement) each get one uniformly
    drawn label other than their own; returns (labels, ids of the changed regions in :func:`regions`)."""
    ids, count = regions(labels, space.ignore_label)
    chosen = rng.choice(np.arange(1, count + 1), size=round_half_up(fraction * count), replace=False)
    out = labels.copy()
    for region in np.sort(chosen):
        where = ids == region
        own = int(labels[where][0])
        drawn = int(rng.integers(0, space.n_labels - 1))
        out[where] = drawn + (drawn >= own)
    return out, np.sort(chosen)


# ------------------------------------------------------------------------------ the interface
class MaskPerturbation:
    """One perturbation: :meth:`apply` (pure: labels and a generator in, labels out), checked against
    the data's label space before sampling (:meth:`check`), named with its params in :meth:`card`."""

    name: ClassVar[str] = "perturbation"
    reference: ClassVar[str] = "segldm"

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)

    def params(self) -> dict[str, Any]:
        return {}

    def check(self, space: LabelSpace) -> None:
        """Raise here (before sampling) when this perturbation cannot be made on this data."""

    def apply(self, labels: np.ndarray, rng: np.random.Generator, space: LabelSpace) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, labels: np.ndarray, index: int, space: LabelSpace) -> np.ndarray:
        """The perturbed copy of mask ``index`` (its generator: ``default_rng([seed, index])``); ignore
        pixels keep the ignore label."""
        clean = np.asarray(labels)
        if clean.ndim != 2:
            raise ValueError(f"{self.name}: a mask is a label map (H, W), got shape {clean.shape}")
        clean = clean.astype(np.int64)
        out = np.asarray(
            self.apply(clean, np.random.default_rng([self.seed, int(index)]), space), dtype=np.int64
        )
        if space.ignore_label is not None:
            ignored = clean == space.ignore_label
            out[ignored] = space.ignore_label
        return out

    def card(self) -> dict[str, Any]:
        """What the perturbed numbers depend on (metrics.json, the protocol card and its key)."""
        return {"name": self.name, "params": self.params(), "seed": self.seed, "reference": self.reference}

    def _check_fill(self, fill: str | int, space: LabelSpace) -> None:
        if fill == "ignore" and space.ignore_label is None:
            raise ValueError(
                f"eval.mask_perturbation ({self.name}): fill=ignore, but this data has no ignore label "
                "(data.ignore_label=null); pass eval.mask_perturbation.fill=random (a random other class per "
                "pixel) or fill=<class id>"
            )
        if fill == "random" and space.n_labels < 2:
            raise ValueError(f"eval.mask_perturbation ({self.name}): fill=random needs at least 2 labels")
        if not isinstance(fill, str) and not (0 <= int(fill) < space.n_labels or fill == space.ignore_label):
            raise ValueError(
                f"eval.mask_perturbation ({self.name}): fill={fill} is neither a class id in "
                f"[0, {space.n_labels}) nor the ignore label; use one, or fill=ignore / fill=random"
            )

    def _check_classes(self, classes: Sequence[int], space: LabelSpace) -> None:
        bad = [c for c in classes if not 0 <= int(c) < space.n_labels]
        if not classes or bad:
            raise ValueError(
                f"eval.mask_perturbation ({self.name}): classes={list(classes)} must list class ids in "
                f"[0, {space.n_labels}) (e.g. the built-in scenes' objects cloud, tree, sun: [1, 4, 7])"
            )


def _fill_value(fill: str | int) -> str | int:
    if isinstance(fill, str) and fill not in FILLS:
        if fill.lstrip("-").isdigit():
            return int(fill)
        raise ValueError(f"fill={fill!r}: expected 'ignore', 'random' or a label id")
    return fill


def _positive(name: str, value: float, what: str) -> None:
    if not value > 0:
        raise ValueError(f"eval.mask_perturbation.{name}={value}: {what}")


class Downsample(MaskPerturbation):
    """SCDM's DS: the mask at 1/``factor`` of its size (nearest), then nearest back up (factor 4 = 256 -> 64)."""

    name = "downsample"
    reference = f"{SCDM} image_process/downsample.py L72-83, guided_diffusion/image_datasets.py L212"

    def __init__(self, factor: int = 4, seed: int = 0) -> None:
        super().__init__(seed)
        self.factor = int(factor)
        _positive("factor", self.factor, "the mask is read at 1/factor of its size; use an integer >= 1")

    def params(self) -> dict[str, Any]:
        return {"factor": self.factor}

    def apply(self, labels: np.ndarray, rng: np.random.Generator, space: LabelSpace) -> np.ndarray:
        return downsample_nearest(labels, self.factor)


class BoundaryDrop(MaskPerturbation):
    """SCDM's Edge: pixels within L1 distance ``radius`` of a label boundary become ``fill``."""

    name = "boundary_drop"
    reference = f"{SCDM} image_process/edge.py L9-15, L51-63"

    def __init__(self, radius: int = 2, fill: str | int = "ignore", seed: int = 0) -> None:
        super().__init__(seed)
        self.radius = int(radius)
        self.fill = _fill_value(fill)
        if self.radius < 0:
            raise ValueError(f"eval.mask_perturbation.radius={radius}: use 0 (the edge pixels alone) or more")

    def params(self) -> dict[str, Any]:
        return {"radius": self.radius, "fill": self.fill}

    def check(self, space: LabelSpace) -> None:
        self._check_fill(self.fill, space)

    def apply(self, labels: np.ndarray, rng: np.random.Generator, space: LabelSpace) -> np.ndarray:
        return fill_pixels(labels, boundary_band(labels, self.radius), self.fill, rng, space)


class PixelDrop(MaskPerturbation):
    """SCDM's Random: every pixel independently with probability ``p`` becomes ``fill``."""

    name = "pixel_drop"
    reference = f"{SCDM} image_process/random.py L130-140"

    def __init__(self, p: float = 0.1, fill: str | int = "ignore", seed: int = 0) -> None:
        super().__init__(seed)
        self.p = float(p)
        self.fill = _fill_value(fill)
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"eval.mask_perturbation.p={p}: a probability in [0, 1]")

    def params(self) -> dict[str, Any]:
        return {"p": self.p, "fill": self.fill}

    def check(self, space: LabelSpace) -> None:
        self._check_fill(self.fill, space)

    def apply(self, labels: np.ndarray, rng: np.random.Generator, space: LabelSpace) -> np.ndarray:
        return fill_pixels(labels, rng.random(labels.shape) < self.p, self.fill, rng, space)


class Erode(MaskPerturbation):
    """Regions of ``classes`` drawn ``k`` pixels too tight; their neighbours take the freed pixels."""

    name = "erode"

    def __init__(self, k: int = 2, classes: Sequence[int] = (), seed: int = 0) -> None:
        super().__init__(seed)
        self.k = int(k)
        self.classes = [int(c) for c in classes]
        _positive("k", self.k, "pixels per side; use an integer >= 1")

    def params(self) -> dict[str, Any]:
        return {"k": self.k, "classes": self.classes}

    def check(self, space: LabelSpace) -> None:
        self._check_classes(self.classes, space)

    def apply(self, labels: np.ndarray, rng: np.random.Generator, space: LabelSpace) -> np.ndarray:
        return erode(labels, self.k, self.classes, space.ignore_label)


class Dilate(Erode):
    """Regions of ``classes`` drawn ``k`` pixels too loose, over their neighbours."""

    name = "dilate"

    def apply(self, labels: np.ndarray, rng: np.random.Generator, space: LabelSpace) -> np.ndarray:
        return dilate(labels, self.k, self.classes, space.ignore_label)


class SwapRegions(MaskPerturbation):
    """A share ``fraction`` of the connected regions (rounded half up) each given one wrong class."""

    name = "swap_regions"

    def __init__(self, fraction: float = 0.1, seed: int = 0) -> None:
        super().__init__(seed)
        self.fraction = float(fraction)
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"eval.mask_perturbation.fraction={fraction}: a share of the regions in [0, 1]")

    def params(self) -> dict[str, Any]:
        return {"fraction": self.fraction}

    def check(self, space: LabelSpace) -> None:
        if space.n_labels < 2:
            raise ValueError("eval.mask_perturbation (swap_regions): needs at least 2 labels")

    def apply(self, labels: np.ndarray, rng: np.random.Generator, space: LabelSpace) -> np.ndarray:
        return swap_regions(labels, self.fraction, rng, space)[0]


__all__ = [
    "BoundaryDrop",
    "Dilate",
    "Downsample",
    "Erode",
    "LabelSpace",
    "MaskPerturbation",
    "PixelDrop",
    "SwapRegions",
    "boundary_band",
    "dilate",
    "downsample_nearest",
    "erode",
    "fill_pixels",
    "label_edges",
    "regions",
    "swap_regions",
]
