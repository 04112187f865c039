"""mIoU and pixel accuracy against hand-computed confusion matrices (ignore label, absent classes, extremes)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segldm.metrics.miou import ConfusionMatrix, confusion_matrix, scores_from_confusion

torch.set_num_threads(1)


def reference_scores(preds, targets, n_classes, ignore_label=None):
    """Pixel-by-pixel loops: TP/FP/FN per class over the whole set, classes with TP+FP+FN = 0 skipped."""
    tp, fp, fn, correct, total = [0] * n_classes, [0] * n_classes, [0] * n_classes, 0, 0
    for pred, target in zip(preds, targets, strict=True):
        for p, t in zip(np.ravel(pred), np.ravel(target), strict=True):
            if ignore_label is not None and t == ignore_label:
                continue
            total += 1
            if p == t:
                tp[t] += 1
                correct += 1
            else:
                fp[p] += 1
                fn[t] += 1
    ious = [tp[c] / (tp[c] + fp[c] + fn[c]) for c in range(n_classes) if tp[c] + fp[c] + fn[c] > 0]
    return sum(ious) / len(ious), correct / total


def test_hand_computed_case() -> None:
    target = np.array([[0, 0, 1], [1, 2, 2]])
    pred = np.array([[0, 1, 1], [1, 0, 2]])
    matrix = confusion_matrix(pred, target, 4)
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[0, :3] = [1, 1, 0]  # rows: target, columns: prediction
    expected[1, :3] = [0, 2, 0]
    expected[2, :3] = [1, 0, 1]
    np.testing.assert_array_equal(matrix, expected)
    scores = scores_from_confusion(matrix, ["a", "b", "c", "d"])
    # IoU: class 0: 1/(2+2-1), class 1: 2/(2+3-2), class 2: 1/(2+1-1); class 3 absent from both
    assert scores.per_class_iou[:3] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert math.isnan(scores.per_class_iou[3]) and scores.present == [True, True, True, False]
    assert scores.miou == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert scores.pixel_accuracy == pytest.approx(4 / 6)
    assert scores.table()[3] == {"id": 3, "name": "d", "iou": None}


def test_all_right_and_all_wrong() -> None:
    target = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    right = scores_from_confusion(confusion_matrix(target, target, 4))
    assert right.miou == 1.0 and right.pixel_accuracy == 1.0
    wrong = scores_from_confusion(confusion_matrix((target + 1) % 4, target, 4))
    assert wrong.miou == 0.0 and wrong.pixel_accuracy == 0.0


def test_ignore_label_pixels_are_not_counted() -> None:
    target = np.array([[0, 1], [255, 255]])
    pred = np.array([[0, 1], [1, 0]])  # wrong, but only where the target is ignored
    scores = scores_from_confusion(confusion_matrix(pred, target, 2, ignore_label=255))
    assert scores.miou == 1.0 and scores.pixel_accuracy == 1.0 and scores.pixels == 2


def test_class_only_predicted_counts_with_iou_zero() -> None:
    target = np.zeros((2, 2), dtype=np.int64)
    pred = np.array([[0, 0], [0, 2]])  # class 2 never in the target, but predicted: a false positive
    scores = scores_from_confusion(confusion_matrix(pred, target, 3))
    assert scores.present == [True, False, True]
    assert scores.per_class_iou[2] == 0.0
    assert scores.miou == pytest.approx((3 / 4 + 0.0) / 2)


def test_set_level_matrix_not_per_image_mean() -> None:
    """Two images: per-image mIoU would average 1.0 and 0.5; the set-level score pools the pixels."""
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([[0, 0, 0, 0]]), torch.tensor([[0, 0, 0, 0]]))
    cm.update(np.array([[1, 0]]), np.array([[1, 1]]))
    scores = cm.compute()
    assert scores.miou == pytest.approx((4 / 5 + 1 / 2) / 2)
    assert scores.pixel_accuracy == pytest.approx(5 / 6)


def test_matches_pixel_loop_reference_on_random_maps() -> None:
    rng = np.random.default_rng(0)
    targets = [rng.integers(0, 6, size=(9, 7)) for _ in range(4)]
    for t in targets:
        t[rng.random(t.shape) < 0.1] = 255
    preds = [
        np.where(rng.random(t.shape) < 0.6, np.where(t == 255, 0, t), rng.integers(0, 6, t.shape))
        for t in targets
    ]
    cm = ConfusionMatrix(6, ignore_label=255)
    for p, t in zip(preds, targets, strict=True):
        cm.update(p, t)
    miou, accuracy = reference_scores(preds, targets, 6, ignore_label=255)
    scores = cm.compute()
    assert scores.miou == pytest.approx(miou, abs=1e-12)
    assert scores.pixel_accuracy == pytest.approx(accuracy, abs=1e-12)


def test_out_of_range_labels_are_errors() -> None:
    with pytest.raises(ValueError, match=r"prediction label\(s\) \[7\] outside \[0, 4\)"):
        confusion_matrix(np.array([0, 7]), np.array([0, 1]), 4)
    with pytest.raises(ValueError, match=r"target label\(s\) \[255\]"):
        confusion_matrix(np.array([0, 1]), np.array([0, 255]), 4)  # 255 is not declared as ignore label
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 4)


def test_empty_set_gives_nan_not_a_crash() -> None:
    scores = ConfusionMatrix(3).compute()
    assert math.isnan(scores.miou) and math.isnan(scores.pixel_accuracy)
