"""Mask alignment of generated images: a segmenter labels them and its labels are scored against the
masks they were generated from (mIoU, pixel accuracy, per-class IoU), and the same segmenter on the
real images gives the ceiling. One :class:`~segldm.metrics.metric.Metric`.

The segmenter is built from its config at :meth:`SegmentationAlignment.setup`, and its label map
checked against the dataset's labels there (a segmenter whose classes do not fit is refused before any
sampling). mIoU comes from one confusion matrix over the set; per-image counts make it bootstrap-able.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from segldm.config.instantiation import instantiate_plain
from segldm.config.progress import tqdm  # plain lines when piped (not \r bars)
from segldm.metrics.bootstrap import miou_from_counts
from segldm.metrics.metric import EvalSet, Metric, MetricContext, MetricResult, value_text
from segldm.metrics.miou import SegmentationScores
from segldm.metrics.reconstruction import first_stage_reconstructions
from segldm.metrics.segmenters import Segmenter, class_names_of, scored_targets, segment_scores


class SegmentationAlignment(Metric):
    """mIoU / pixel accuracy of a segmenter's labels of the generated images against their masks."""

    name = "segmentation"
    directions = {
        "miou": "maximize",
        "pixel_accuracy": "maximize",
        "miou_real": "maximize",
        "pixel_accuracy_real": "maximize",
        "first_stage_miou": "maximize",
    }

    def __init__(
        self,
        segmenter: Any,
        score_real: bool = True,
        progress: bool = True,
        first_stage_miou: bool = False,
        reconstruct_batch_size: int = 8,
    ) -> None:
        self.segmenter_config = segmenter
        self.score_real = bool(score_real)
        self.first_stage_miou = bool(first_stage_miou)
        self.reconstruct_batch_size = int(reconstruct_batch_size)
        self.progress = bool(progress)
        self.segmenter: Segmenter | None = None
        self.context = MetricContext()

    def setup(self, context: MetricContext) -> None:
        if self.segmenter_config is None:
            raise ValueError(
                "the segmentation metric needs a segmenter (a conf/segmenter option, e.g. segmenter=trained "
                "with segmenter.ckpt=<python -m segldm.train_segmenter output>)"
            )
        self.segmenter = instantiate_plain(self.segmenter_config, device=str(context.device))
        self.context = context
        scored_targets(self.segmenter, context.n_labels, context.ignore_label)  # refuses a misfit now

    def score(
        self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], desc: str
    ) -> SegmentationScores:
        assert self.segmenter is not None
        c = self.context
        names = class_names_of(self.segmenter, c.n_labels, c.ignore_label, c.class_names)
        with tqdm(total=len(images), desc=desc, unit="img", disable=not self.progress) as bar:
            return segment_scores(
                self.segmenter, images, labels, c.n_labels, c.ignore_label, names, progress=bar
            )

    def compute(self, images: EvalSet) -> MetricResult:
        generated = self.score(images.generated, images.labels, "segmenting generated")
        values: dict[str, float | None] = {"miou": generated.miou, "pixel_accuracy": generated.pixel_accuracy}
        real = None
        if self.score_real and images.real is not None:
            real = self.score(images.real, images.labels, "segmenting real")
            values |= {"miou_real": real.miou, "pixel_accuracy_real": real.pixel_accuracy}
        reconstructed = (
            first_stage_reconstructions(images, self.reconstruct_batch_size)
            if self.first_stage_miou
            else None
        )
        if reconstructed is not None:  # the LDM's ceiling: what its first stage can draw of these masks
            values["first_stage_miou"] = self.score(
                reconstructed, images.labels, "segmenting reconstructions"
            ).miou
        details = {"per_class": self.per_class_rows(generated, real, images.labels)}
        counts = generated.per_image

        def resample(idx: np.ndarray) -> Mapping[str, float]:
            return {"miou": miou_from_counts(counts[idx].sum(0))}

        return MetricResult(values, details, resample if counts is not None else None)

    def per_class_rows(
        self, generated: SegmentationScores, real: SegmentationScores | None, labels: Sequence[np.ndarray]
    ) -> list[dict[str, Any]]:
        """Per segmenter class: IoU on generated and real images (None where absent), mask pixel share."""
        assert self.segmenter is not None
        c = self.context
        targets: Callable[[np.ndarray], np.ndarray] = scored_targets(
            self.segmenter, c.n_labels, c.ignore_label
        )
        n = self.segmenter.n_classes
        counts = np.zeros(n, dtype=np.int64)
        for mask in labels:
            mapped = targets(mask)
            counts += np.bincount(mapped[mapped >= 0].ravel(), minlength=n)[:n]
        total = max(int(counts.sum()), 1)
        names = class_names_of(self.segmenter, c.n_labels, c.ignore_label, c.class_names)
        return [
            {
                "id": i,
                "name": names[i],
                "iou_generated": generated.per_class_iou[i] if generated.present[i] else None,
                "iou_real": real.per_class_iou[i] if real is not None and real.present[i] else None,
                "mask_pixel_share": counts[i] / total,
            }
            for i in range(n)
        ]

    def card(self) -> dict[str, Any]:
        assert self.segmenter is not None
        return {"metric": self.name, "segmenter": self.segmenter.card()}

    def report_rows(
        self, result: MetricResult, intervals: Mapping[str, Sequence[float]]
    ) -> list[tuple[str, str, str]]:
        v = result.values
        return [
            (
                "mIoU",
                value_text(v.get("miou"), intervals.get("miou"), 4),
                f"real images: {value_text(v.get('miou_real'), None, 4)}"
                + (
                    f"; its first stage's reconstructions of them: {value_text(v['first_stage_miou'], None, 4)}"
                    if v.get("first_stage_miou") is not None
                    else ""
                ),
            ),
            (
                "pixel accuracy",
                value_text(v.get("pixel_accuracy"), None, 4),
                f"real images: {value_text(v.get('pixel_accuracy_real'), None, 4)}",
            ),
        ]


__all__ = ["SegmentationAlignment"]
