"""COCO-Stuff 164k (COCO 2017 images + `stuffthingmaps_trainval2017.zip`) as distributed.

Layout (`data.images_root` defaults to `data.root`, `data.labels_root` to
`<data.root>/stuffthingmaps_trainval2017`)::

    <images_root>/{train2017,val2017}/<12-digit id>.jpg          train2017.zip, val2017.zip
    <labels_root>/{train2017,val2017}/<12-digit id>.png          mode L: ids 0..181, 255 unlabelled
    <instances>/<12-digit id>.png   (optional, one folder per split) the instance maps SPADE's
                                    datasets/coco_generate_instance_map.py writes (8-bit ids)

The preset follows SPADE (docs/datasets.md#coco-stuff): ids 0..181 -> channels 0..181, unlabelled
(255) -> channel 182, 183 channels; instance maps from `data.train_instances` / `data.val_instances`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from segldm.data.layouts import (
    BenchmarkSegmentation,
    IdRule,
    id_range_text,
    index_files,
    pair_up,
    require_folders,
    shifted_ids,
)
from segldm.data.transforms import INSTANCE_MODES
from segldm.errors import StartupError

SPLITS = ("train2017", "val2017")
LABELS_DIR = "stuffthingmaps_trainval2017"


class COCOStuff(BenchmarkSegmentation):
    """One split (`train2017` or `val2017`) of COCO-Stuff 164k, with SPADE's instance maps if given."""

    preset = "data=cocostuff"
    dataset = "COCO-Stuff"
    has_instances = True
    instance_modes = INSTANCE_MODES
    instance_expected = "an 8- or 16-bit id map (SPADE's coco_generate_instance_map.py writes mode L)"

    def __init__(
        self,
        images_root: str,
        labels_root: str,
        split: str = "train2017",
        instances: str | None = None,
        *,
        n_labels: int = 183,
        label_range: Sequence[int] = (0, 181),
        label_shift: int = 0,
        dontcare_id: int | None = 255,
        dontcare_channel: int | None = 182,
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
        if split not in SPLITS:
            raise ValueError(f"{self.preset}: split={split!r} is not one of {SPLITS}")
        if instance_edges and not instances:
            key = "train_instances" if split == SPLITS[0] else "val_instances"
            raise StartupError(
                f"{self.preset}: data.instance_edges=true but data.{key} is null; point it at the folder of {split} "
                "instance maps SPADE's datasets/coco_generate_instance_map.py writes, or set data.instance_edges=false"
            )
        table = shifted_ids(label_range, label_shift, dontcare_id, dontcare_channel)
        rule = IdRule(table, n_labels, ignore_label, f"ids {id_range_text(table)}", self.preset)
        self.images_root, self.labels_root = Path(images_root), Path(labels_root)
        images, labels = self.images_root / split, self.labels_root / split
        folders = [
            (images, f"the COCO 2017 {split} photos (unzip {split}.zip into data.images_root)"),
            (labels, f"the {split} label maps (unzip {LABELS_DIR}.zip into data.labels_root)"),
        ]
        self.instance_root = Path(instances) if instances and instance_edges else None
        if self.instance_root is not None:
            folders.append((self.instance_root, f"the {split} instance maps"))
        require_folders(
            self.preset,
            self.dataset,
            self.images_root,
            folders,
            "point data.root at the folder holding train2017/, val2017/ and stuffthingmaps_trainval2017/ "
            "(or set data.images_root / data.labels_root)",
        )
        instance_root = self.instance_root
        pairs = pair_up(
            index_files(images, ".jpg"),
            index_files(labels, ".png"),
            lambda key: images / f"{key}.jpg",
            lambda key: labels / f"{key}.png",
            images,
            None if instance_root is None else (lambda key: instance_root / f"{key}.png"),
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
