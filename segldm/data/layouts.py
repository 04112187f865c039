"""What the benchmark presets share: official folder layouts, id -> channel rules, pairing by name.

`data=ade20k`, `data=cocostuff`, `data=cityscapes` and `data=celebamask_hq` read the files exactly as
their owners distribute them (docs/datasets.md). Each is a `BenchmarkSegmentation`, so it gets the
file, size and label checks of `PairedSegmentation` (and `python -m segldm.data.check`,
`data.precheck`), plus what an official layout allows to check before any long work:

- the root is the dataset's layout (the error names the folder that was expected), each split's
  folders exist;
- every image has its label map and every label map its image (both counted, the first named);
- every label id is one the dataset defines (`IdRule`), mapped to its model channel by the
  preset's published protocol;
- `data.instance_edges=true` only where the dataset has instance maps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from segldm.data.folder import Pair, PairedSegmentation
from segldm.data.transforms import OUT_OF_RANGE, SKIP_HINT, LabelRemap, SampleError
from segldm.errors import MissingFileError, StartupError


def _few(values: Iterable[int], limit: int = 10) -> str:
    values = [int(v) for v in values]
    shown = ", ".join(str(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


class IdRule(LabelRemap):
    """A dataset's stored label ids -> model channels; any id the dataset does not define is an error.

    `table` maps every valid stored id to its channel in [0, n_labels) or to `ignore_label` (an
    all-zero condition vector). Unlike a plain `LabelRemap` dict, an id missing from the table is
    refused (naming the file and the ids), never passed through.
    """

    def __init__(
        self,
        table: Mapping[int, int],
        n_labels: int,
        ignore_label: int | None,
        valid: str,
        preset: str,
    ) -> None:
        if not table:
            raise StartupError(f"{preset}: the label rule maps no id")
        bad = sorted(
            {
                int(v)
                for v in table.values()
                if not (0 <= v < n_labels or (ignore_label is not None and v == ignore_label))
            }
        )
        if bad:
            raise StartupError(
                f"{preset}: the label rule maps ids to channels {bad}, outside [0, data.n_labels={n_labels}) and "
                f"not data.ignore_label={ignore_label}; make data.n_labels / data.ignore_label / the rule's keys "
                "agree (docs/datasets.md)"
            )
        if min(table) < 0:
            raise StartupError(f"{preset}: stored label ids must be >= 0, got {min(table)}")
        self.table = np.zeros(max(table) + 1, dtype=np.int64)
        self.known = np.zeros(max(table) + 1, dtype=bool)
        for stored, channel in table.items():
            self.table[stored], self.known[stored] = channel, True
        self.strict = True
        self.valid = valid
        self.preset = preset

    def __call__(self, labels: np.ndarray, path: Path) -> np.ndarray:
        size = len(self.table)
        lo, hi = int(labels.min()), int(labels.max())
        if lo >= 0 and hi < size and self.known[labels].all():
            return self.table[labels]
        ids = np.unique(labels)
        bad = [int(v) for v in ids if not (0 <= v < size and self.known[v])]
        counts = ", ".join(f"{v} ({int((labels == v).sum())} px)" for v in bad[:10])
        raise SampleError(
            f"{path}: label ids {counts}{', ...' if len(bad) > 10 else ''} are not {self.preset} ids "
            f"({self.valid}); is this file from another dataset or converted (e.g. to train ids or colours)? "
            f"{SKIP_HINT}",
            path,
            OUT_OF_RANGE,
        )

    @property
    def channels(self) -> dict[int, int]:
        return {int(i): int(self.table[i]) for i in np.flatnonzero(self.known)}


def shifted_ids(
    label_range: Iterable[int], label_shift: int, dontcare_id: int | None, dontcare_channel: int | None
) -> dict[int, int]:
    """{stored id: channel}: ids lo..hi (inclusive) -> id + shift, and the don't-care id -> its channel."""
    lo, hi = (int(v) for v in label_range)
    table = {i: i + int(label_shift) for i in range(lo, hi + 1)}
    if dontcare_id is not None:
        if dontcare_channel is None:
            raise StartupError(
                f"data.dontcare_id={dontcare_id} needs data.dontcare_channel (its channel, or data.ignore_label "
                "for an all-zero vector)"
            )
        table[int(dontcare_id)] = int(dontcare_channel)
    return table


def id_range_text(ids: Iterable[int]) -> str:
    """Ids as compact ranges, e.g. '0-181, 255'."""
    ids = sorted(int(i) for i in ids)
    parts, start, prev = [], ids[0], ids[0]
    for cur in ids[1:]:
        if cur != prev + 1:
            parts.append(f"{start}-{prev}" if prev != start else str(start))
            start = cur
        prev = cur
    parts.append(f"{start}-{prev}" if prev != start else str(start))
    return ", ".join(parts)


# ---------------------------------------------------------------------------- folders
def layout_root(root: str | Path, top: str, marker: str) -> Path:
    """`root`, or `root/<top>` when the dataset's own top folder was unpacked inside it.

    `marker` is a folder every copy of the layout has (relative to the layout's root).
    """
    path = Path(root)
    if not (path / marker).is_dir() and (path / top / marker).is_dir():
        return path / top
    return path


def require_folders(
    preset: str, dataset: str, root: Path, folders: list[tuple[Path, str]], hint: str
) -> None:
    """Each folder must exist; the error names the first missing one, what it holds and the way out.

    A root missing altogether, or one without the layout's first folder, is "not the layout"; a
    root with the layout but without a split's folder says the split is missing.
    """
    if not root.is_dir():
        raise MissingFileError(f"{preset}: data.root={root} does not exist; {hint}")
    for path, what in folders:
        if path.is_dir():
            continue
        if path == folders[0][0]:
            raise MissingFileError(
                f"{preset}: {root} is not the {dataset} layout: expected the folder {path} ({what}); {hint}"
            )
        raise MissingFileError(
            f"{preset}: folder {path} ({what}) is missing under {root}; the {dataset} download has it - unpack "
            f"it there (or check the split name). {hint}"
        )


def index_files(folder: Path, suffix: str, recursive: bool = False) -> dict[str, Path]:
    """{key: path} of the files named `<key><suffix>` under `folder` (key: relative path minus suffix)."""
    found = folder.rglob(f"*{suffix}") if recursive else folder.glob(f"*{suffix}")
    return {
        path.relative_to(folder).as_posix()[: -len(suffix)]: path for path in sorted(found) if path.is_file()
    }


def pair_up(
    images: Mapping[str, Path],
    labels: Mapping[str, Path],
    image_for: Callable[[str], Path],
    label_for: Callable[[str], Path],
    image_root: Path,
    instance_for: Callable[[str], Path] | None = None,
) -> list[Pair]:
    """One pair per key of either side: an image without its label map (or a label map without its
    image) becomes a pair whose other file does not exist, which the dataset then reports (counted,
    the first named) or skips (`data.on_error=skip`)."""
    pairs = []
    for key in sorted(set(images) | set(labels)):
        image = images.get(key) or image_for(key)
        label = labels.get(key) or label_for(key)
        relative = image.relative_to(image_root).as_posix()
        instance = instance_for(key) if instance_for is not None else None
        pairs.append(Pair(relative, image, label, instance))
    return pairs


class BenchmarkSegmentation(PairedSegmentation):
    """A `PairedSegmentation` over one split of an official layout; subclasses find the pairs.

    `has_instances`: whether the dataset distributes instance maps (else `instance_edges` is refused).
    """

    preset = "data=<benchmark>"
    dataset = "<benchmark>"
    has_instances = False

    def no_instances(self, instance_edges: bool, why: str) -> None:
        if instance_edges and not self.has_instances:
            raise StartupError(
                f"{self.preset}: data.instance_edges=true, but {self.dataset} has no instance maps ({why}); "
                "set data.instance_edges=false"
            )

    def unpaired_masks(self) -> list[Path]:
        """None: a label map without its image is an error here (counted when the split is built)."""
        return []
