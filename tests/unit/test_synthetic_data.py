import numpy as np
import pytest
import torch

from segldm.data.datamodule import SegmentationDataModule
from segldm.data.synthetic import N_CLASSES, SyntheticScenes, nearest_color_labels


def test_sample_format_matches_sflckr_layout():
    sample = SyntheticScenes(size=32, length=4)[1]
    assert sample["image"].shape == (32, 32, 3) and sample["image"].dtype == torch.float32
    assert sample["image"].min() >= -1.0 and sample["image"].max() <= 1.0
    assert sample["segmentation"].shape == (32, 32, N_CLASSES)
    assert torch.equal(sample["segmentation"].sum(-1), torch.ones(32, 32))
    assert torch.equal(sample["segmentation"].argmax(-1), sample["label_map"])


def test_deterministic_per_seed_and_index():
    a, b = SyntheticScenes(32, 10, seed=3), SyntheticScenes(32, 10, seed=3)
    assert torch.equal(a[7]["image"], b[7]["image"])
    assert not torch.equal(a[7]["image"], a[8]["image"])
    assert not torch.equal(a[7]["image"], SyntheticScenes(32, 10, seed=4)[7]["image"])


def test_regions_follow_the_mask():
    """Each class's pixels sit nearest to that class's own colour: the images are learnable from masks."""
    ds = SyntheticScenes(64, 40)
    correct = total = 0
    for i in range(len(ds)):
        image, labels = ds.scene(i)
        correct += (nearest_color_labels(image) == labels).sum()
        total += labels.size
    assert correct / total > 0.8


def test_classes_all_occur():
    ds = SyntheticScenes(64, 200)
    seen = set()
    for i in range(len(ds)):
        seen |= set(np.unique(ds.scene(i)[1]).tolist())
    assert seen == set(range(N_CLASSES))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="size"):
        SyntheticScenes(size=0)
    with pytest.raises(IndexError):
        SyntheticScenes(32, 2)[2]


def test_datamodule_checks_label_count_and_batch_size():
    ds = SyntheticScenes(32, 4)
    with pytest.raises(ValueError, match="n_labels=5"):
        SegmentationDataModule(ds, ds, size=32, n_labels=5)
    with pytest.raises(ValueError, match="batch_size"):
        SegmentationDataModule(ds, ds, size=32, n_labels=N_CLASSES, batch_size=0)
    dm = SegmentationDataModule(ds, ds, size=32, n_labels=N_CLASSES, batch_size=2)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 32, 32, 3)
