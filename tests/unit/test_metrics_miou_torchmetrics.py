"""The segmenter's in-training validation scores (torchmetrics accumulators) equal segldm's summed-confusion
mIoU and pixel accuracy, in one process and split over two DDP processes (gloo) that sync at compute."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from segldm.metrics.miou import ConfusionMatrix
from segldm.metrics.segmenters.trained import validation_metrics

torch.set_num_threads(1)


def batches(seed: int, n_classes: int, ignore_label: int | None, count: int = 6):
    """Random (prediction, target) label maps; class n_classes-1 never appears (absent from both)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        target = rng.integers(0, n_classes - 1, size=(2, 9, 7))
        pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, n_classes - 1, target.shape))
        if ignore_label is not None:
            target = np.where(rng.random(target.shape) < 0.15, ignore_label, target)
        out.append((torch.from_numpy(pred), torch.from_numpy(target)))
    return out


def segldm_scores(pairs, n_classes, ignore_label):
    matrix = ConfusionMatrix(n_classes, ignore_label)
    for pred, target in pairs:
        matrix.update(pred, target)
    return matrix.compute()


@pytest.mark.parametrize("ignore_label", [None, 255])
def test_torchmetrics_accumulators_equal_segldm_scores(ignore_label: int | None) -> None:
    n_classes = 6
    pairs = batches(0, n_classes, ignore_label)
    miou, accuracy = validation_metrics(n_classes, ignore_label)
    for pred, target in pairs:
        miou.update(pred, target)
        accuracy.update(pred, target)
    expected = segldm_scores(pairs, n_classes, ignore_label)
    assert expected.present[-1] is False  # the absent class is left out of both means
    assert miou.compute().item() == pytest.approx(expected.miou, abs=1e-6)
    assert accuracy.compute().item() == pytest.approx(expected.pixel_accuracy, abs=1e-6)


def test_an_in_range_ignore_label_the_net_never_predicts_scores_the_same() -> None:
    """ignore label 0 inside [0, C): pixels labelled 0 are not scored by either implementation."""
    n_classes = 5
    pairs = [(torch.where(p == 0, 1, p), t) for p, t in batches(1, n_classes, 0)]
    miou, accuracy = validation_metrics(n_classes, 0)
    for pred, target in pairs:
        miou.update(pred, target)
        accuracy.update(pred, target)
    expected = segldm_scores(pairs, n_classes, 0)
    assert miou.compute().item() == pytest.approx(expected.miou, abs=1e-6)
    assert accuracy.compute().item() == pytest.approx(expected.pixel_accuracy, abs=1e-6)


def ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        miou, accuracy = validation_metrics(6, 255)
        for pred, target in batches(0, 6, 255)[rank::world]:  # each process sees its share of the set
            miou.update(pred, target)
            accuracy.update(pred, target)
        values = torch.stack([miou.compute(), accuracy.compute()])  # compute() all-gathers the states
        torch.save(values, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ddp_processes_sync_to_the_whole_set_score(tmp_path: Path) -> None:
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    expected = segldm_scores(batches(0, 6, 255), 6, 255)
    for rank in range(2):
        miou, accuracy = torch.load(tmp_path / f"rank{rank}.pt").tolist()
        assert miou == pytest.approx(expected.miou, abs=1e-6)
        assert accuracy == pytest.approx(expected.pixel_accuracy, abs=1e-6)
