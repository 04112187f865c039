"""The trained segmenter's pieces: any image size in, labels out; exact uint8 round trip of dataset images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from segldm.data.synthetic import SyntheticScenes
from segldm.metrics.segmenters import image_to_uint8, real_pairs, segment_scores
from segldm.metrics.segmenters.label_maps import SameIds
from segldm.metrics.segmenters.trained import SegmenterModule, SegNet, TrainedSegmenter, segmenter_checkpoint
from segldm.storage.checkpoint_files import CheckpointError, save_checkpoint

torch.set_num_threads(1)


def test_dataset_images_round_trip_to_the_exact_uint8_pixels() -> None:
    dataset = SyntheticScenes(size=32, length=2, seed=3, one_hot=False)
    image, _ = dataset.scene(1)
    assert np.array_equal(image_to_uint8(dataset[1]["image"]), image)


def test_segmenter_checkpoint_round_trip_and_odd_sizes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = SegmenterModule(SegNet(8, (4, 4, 4)))
    path = save_checkpoint(
        segmenter_checkpoint(module, {"data": {"size": 32}}, {"miou": 0.5}), tmp_path / "s.ckpt"
    )
    segmenter = TrainedSegmenter(path, batch_size=2)
    assert segmenter.n_classes == 8 and segmenter.real_scores == {"miou": 0.5}
    images = torch.randint(0, 256, (3, 3, 30, 50), dtype=torch.uint8)  # not multiples of 4: padded inside
    labels = segmenter.predict(images)
    assert labels.shape == (3, 30, 50) and labels.dtype == torch.int64
    module.eval()
    with torch.no_grad():
        expected = module(images.float() / 127.5 - 1).argmax(1)
    assert torch.equal(labels, expected)


def test_a_perfect_segmenter_scores_one() -> None:
    class Oracle:
        """Labels each scene by looking its image up: a segmenter that is always right."""

        n_classes = 8
        name = "oracle"
        label_map = SameIds(8, dontcare_channels=0)
        class_names = None

        def __init__(self, scenes: dict[bytes, np.ndarray]) -> None:
            self.scenes = scenes

        def predict(self, images: torch.Tensor) -> torch.Tensor:
            return torch.stack(
                [torch.from_numpy(self.scenes[im.permute(1, 2, 0).numpy().tobytes()]) for im in images]
            ).long()

    pairs = list(real_pairs(SyntheticScenes(size=32, length=3, seed=0, one_hot=True), 3))
    oracle = Oracle({p.image.tobytes(): p.labels for p in pairs})
    scores = segment_scores(oracle, [p.image for p in pairs], [p.labels for p in pairs], oracle.n_classes, None, batch_size=2)
    assert scores.miou == 1.0 and scores.pixel_accuracy == 1.0


def test_wrong_checkpoint_kind_is_named(tmp_path: Path) -> None:
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"encoder.x": torch.zeros(1), "quantize.y": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="expected a segldm segmenter checkpoint.*VQ autoencoder"):
        TrainedSegmenter(path)
