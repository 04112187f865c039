"""A metric added the way a user adds one: this class plus a config entry (``+metrics.toy._target_=
tests.toy_metric.Redness`` for eval, ``+callbacks.generation_metrics.metrics.toy._target_=...`` while
training). Its name would have been guessed "lower is better"; it declares the opposite."""

from __future__ import annotations

from typing import Any

import numpy as np

from segldm.metrics.metric import EvalSet, Metric, MetricResult


class Redness(Metric):
    """Mean (red - green) / 255 of the generated images: a number that moves with the images."""

    name = "redness"
    directions = {"redness": "maximize"}

    def compute(self, images: EvalSet) -> MetricResult:
        per_image = np.array(
            [(im[..., 0].astype(np.float64) - im[..., 1]).mean() / 255 for im in images.generated]
        )
        return MetricResult(
            {"redness": float(per_image.mean())},
            {"redness_per_image": per_image.tolist()},
            lambda idx: {"redness": float(per_image[idx].mean())},
        )

    def card(self) -> dict[str, Any]:
        return {"metric": self.name, "implementation": "tests/toy_metric.py"}
