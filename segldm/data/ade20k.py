"""ADE20K (MIT Scene Parsing benchmark, `ADEChallengeData2016.zip`) as distributed.

Layout under `data.root` (the unzipped `ADEChallengeData2016/`, or the folder holding it)::

    images/{training,validation}/ADE_<split>_<n>.jpg
    annotations/{training,validation}/ADE_<split>_<n>.png    mode L, ids 0..150 (0 = "other")

The preset follows SPADE (docs/datasets.md#ade20k): ids 1..150 -> channels 0..149, "other" (0) ->
channel 150, 151 channels; no instance maps.
"""

from __future__ import annotations

from collections.abc import Sequence

from segldm.data.layouts import (
    BenchmarkSegmentation,
    IdRule,
    id_range_text,
    index_files,
    layout_root,
    pair_up,
    require_folders,
    shifted_ids,
)

SPLITS = ("training", "validation")
TOP = "ADEChallengeData2016"


class ADE20K(BenchmarkSegmentation):
    """One split (`training` or `validation`) of ADEChallengeData2016."""

    preset = "data=ade20k"
    dataset = "ADE20K (ADEChallengeData2016)"
    has_instances = False

    def __init__(
        self,
        root: str,
        split: str = "training",
        *,
        n_labels: int = 151,
        label_range: Sequence[int] = (1, 150),
        label_shift: int = -1,
        dontcare_id: int | None = 0,
        dontcare_channel: int | None = 150,
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
        self.no_instances(instance_edges, "SPADE, OASIS and SDM train it without")
        if split not in SPLITS:
            raise ValueError(f"{self.preset}: split={split!r} is not one of {SPLITS}")
        table = shifted_ids(label_range, label_shift, dontcare_id, dontcare_channel)
        rule = IdRule(table, n_labels, ignore_label, f"ids {id_range_text(table)}", self.preset)
        self.root = layout_root(root, TOP, "annotations")
        images, annotations = self.root / "images" / split, self.root / "annotations" / split
        require_folders(
            self.preset,
            self.dataset,
            self.root,
            [
                (self.root / "images", "the photos, images/{training,validation}/*.jpg"),
                (self.root / "annotations", "the label maps, annotations/{training,validation}/*.png"),
                (images, f"the {split} photos"),
                (annotations, f"the {split} label maps"),
            ],
            "point data.root at the unzipped ADEChallengeData2016 folder",
        )
        pairs = pair_up(
            index_files(images, ".jpg"),
            index_files(annotations, ".png"),
            lambda key: images / f"{key}.jpg",
            lambda key: annotations / f"{key}.png",
            images,
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
            instance_edges=False,
        )
