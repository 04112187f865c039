"""Bootstrap intervals, precision/recall and real-vs-real FID against closed forms and torch-fidelity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segldm.metrics.bootstrap import (
    bootstrap_intervals,
    fid_low_rank,
    miou_from_counts,
    precision_recall,
    real_halves_fid,
)
from segldm.metrics.fid import fid_kid
from segldm.metrics.miou import confusion_matrix, per_image_counts, scores_from_confusion


@pytest.mark.parametrize(("n", "d"), [(100, 16), (24, 64)])  # more samples than dimensions, and fewer
def test_low_rank_fid_is_torch_fidelitys_fid(n, d):
    gen = torch.Generator().manual_seed(n)
    a = torch.randn(n, d, generator=gen, dtype=torch.float64)
    b = 0.7 * torch.randn(n, d, generator=gen, dtype=torch.float64) + 0.3
    assert fid_low_rank(a, b) == pytest.approx(fid_kid(a, b, 2, 4)["fid"], rel=1e-6)
    assert fid_low_rank(a, a) == pytest.approx(0.0, abs=1e-8)


def test_miou_from_per_image_counts_is_the_summed_confusion_miou():
    rng = np.random.default_rng(0)
    targets = [rng.integers(0, 6, size=(9, 7)) for _ in range(5)]
    preds = [np.where(rng.random(t.shape) < 0.7, t, rng.integers(0, 6, size=t.shape)) for t in targets]
    targets[2][0, :] = 255  # ignore pixels count nowhere
    matrix = sum(confusion_matrix(p, t, 6, 255) for p, t in zip(preds, targets, strict=True))
    counts = np.stack(
        [per_image_counts(confusion_matrix(p, t, 6, 255)) for p, t in zip(preds, targets, strict=True)]
    )
    assert counts.shape == (5, 3, 6)
    assert miou_from_counts(counts.sum(0)) == pytest.approx(scores_from_confusion(matrix).miou, rel=1e-12)


def test_bootstrap_intervals_of_exact_agreement_are_points_and_cover_the_estimate():
    gen = torch.Generator().manual_seed(1)
    real = torch.randn(30, 8, generator=gen, dtype=torch.float64)
    perfect = np.zeros((30, 3, 4), dtype=np.int64)
    perfect[:, :, 0] = 10  # every pixel of class 0 predicted right: IoU 1 on every draw
    out = bootstrap_intervals(real.clone(), real, perfect, draws=50, seed=3)
    assert out["fid"] == pytest.approx([0.0, 0.0], abs=1e-8) and out["miou"] == [1.0, 1.0]
    fake = real + 0.5 * torch.randn(30, 8, generator=gen, dtype=torch.float64)
    out = bootstrap_intervals(fake, real, None, draws=200, seed=3)
    low, high = out["fid"]
    assert low < fid_low_rank(fake, real) < high and "miou" not in out and out["draws"] == 200
    # resampled sets have fewer distinct samples: their FIDs sit above the full-set value
    assert out["fid_resampling_shift"] > 0
    # the same seed gives the same interval (the report is reproducible)
    assert bootstrap_intervals(fake, real, None, draws=200, seed=3)["fid"] == out["fid"]


def test_precision_recall_closed_forms():
    gen = torch.Generator().manual_seed(2)
    real = torch.randn(40, 5, generator=gen)
    assert precision_recall(real.clone(), real) == {
        "precision": 1.0,
        "recall": 1.0,
        "f_score": pytest.approx(1.0),
    }
    far = real + 1000.0  # a copy moved far away: no generated sample in a real ball, and vice versa
    assert precision_recall(far, real)["precision"] == 0.0 and precision_recall(far, real)["recall"] == 0.0
    with pytest.raises(ValueError, match="more than 3 images"):
        precision_recall(real[:3], real)


def test_real_halves_fid_splits_even_and_odd_images():
    gen = torch.Generator().manual_seed(4)
    half = torch.randn(10, 6, generator=gen, dtype=torch.float64)
    twins = half.repeat_interleave(2, dim=0)  # image 2k and 2k+1 identical: the two halves are equal
    assert real_halves_fid(twins) == pytest.approx(0.0, abs=1e-8)
    mixed = torch.randn(21, 6, generator=gen, dtype=torch.float64)
    assert real_halves_fid(mixed) == pytest.approx(
        fid_kid(mixed[0:20:2], mixed[1:20:2], 2, 4)["fid"], rel=1e-6
    )
