"""The metric interface: directions come from the classes (not from names), the paired bootstrap, and
the label maps that put a dataset's masks into a segmenter's classes."""

from __future__ import annotations

import numpy as np
import pytest

import segldm.metrics.alignment  # noqa: F401  (defines the built-in segmentation metric)
from segldm.config.metric_directions import objective_direction
from segldm.metrics.metric import EvalSet, Metric, MetricResult, flat_values, paired_bootstrap
from segldm.metrics.segmenters.label_maps import (
    NOT_SCORED,
    CityscapesTrainIds,
    LabelSpaceMismatch,
    PermutedIds,
    SameIds,
    apply_label_map,
)


def test_directions_are_declared_by_the_metric_classes() -> None:
    assert objective_direction("val/miou") == "maximize"
    assert objective_direction("eval/pixel_accuracy") == "maximize"
    assert objective_direction("val/loss") == "minimize"  # losses: minimised
    with pytest.raises(
        ValueError, match=r"sweep.objective=val/sharpness: no metric declares.*sweep.direction"
    ):
        objective_direction("val/sharpness")
    # a metric configured by _target_ is imported, and so declares its direction
    toy = {"toy": {"_target_": "tests.toy_metric.Redness"}}
    assert objective_direction("val/redness", toy) == "maximize"


def test_a_metric_with_a_bad_direction_is_refused_when_defined() -> None:
    with pytest.raises(ValueError, match="direction of 'x' is 'up'"):

        class Bad(Metric):  # noqa: F841
            directions = {"x": "up"}


class MeanOf(Metric):
    """The mean of a per-sample number: resampled exactly like the bootstrap's index draws."""

    name = "mean_of"

    def __init__(self, values: np.ndarray, key: str) -> None:
        self.values, self.key = values, key

    def compute(self, images: EvalSet) -> MetricResult:
        v = self.values
        return MetricResult(
            {self.key: float(v.mean())}, resample=lambda idx: {self.key: float(v[idx].mean())}
        )


def test_paired_bootstrap_draws_the_same_samples_for_every_metric() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(size=200)
    images = EvalSet([], [], [])
    results = {
        "a": MeanOf(values, "a").compute(images),
        "b": MeanOf(values, "b").compute(images),  # the same numbers: paired draws give the same interval
        "c": MeanOf(np.full(200, 3.0), "c").compute(images),
        "d": MetricResult({"d": 1.0}),  # not resampleable: no interval
    }
    out = paired_bootstrap(results, 200, draws=300, seed=1, level=0.9)
    assert out["a"] == out["b"] and out["a"][0] < values.mean() < out["a"][1]
    assert out["c"] == [3.0, 3.0] and "d" not in out
    width = out["a"][1] - out["a"][0]
    assert width == pytest.approx(2 * 1.645 * values.std() / np.sqrt(200), rel=0.2)  # the CLT's width
    assert flat_values(results) == {"a": values.mean(), "b": values.mean(), "c": 3.0, "d": 1.0}
    assert paired_bootstrap(results, 1, draws=10) == {"draws": 0, "level": 0.95}


def test_label_maps() -> None:
    ade = SameIds(150).lookup(151, None)  # ADE20K: channels 0..149 are the classes, 150 ("other") not scored
    assert ade[:150].tolist() == list(range(150)) and ade[150] == NOT_SCORED
    with pytest.raises(LabelSpaceMismatch, match=r"predicts 150 classes \(\+1 don't-care\).*data.n_labels=8"):
        SameIds(150).lookup(8, None)
    own = SameIds(8, dontcare_channels=0).lookup(8, 3)  # the ignore label is not scored
    assert own[3] == NOT_SCORED and own[4] == 4
    city = CityscapesTrainIds().lookup(35, None)
    assert (city[7], city[26], city[0], city[33]) == (0, 13, NOT_SCORED, 18)
    assert sorted(set(city[city >= 0].tolist())) == list(range(19))
    assert CityscapesTrainIds().lookup(19, 255).tolist() == list(range(19))
    with pytest.raises(LabelSpaceMismatch, match="neither the 35 labelIds"):
        CityscapesTrainIds().lookup(20, None)
    assert PermutedIds([2, 0, 1], 3).lookup(3, None).tolist() == [2, 0, 1]
    masks = np.array([[7, 26, 255], [0, 33, 7]])
    assert apply_label_map(city, masks, 255).tolist() == [[0, 13, NOT_SCORED], [NOT_SCORED, 18, 0]]
    with pytest.raises(LabelSpaceMismatch, match=r"mask ids \[40\]"):
        apply_label_map(city, np.array([[40]]), 255)
