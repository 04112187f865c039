"""S-FLCKR loader against taming's `SegmentationBase` outputs (fixture) and the seed-config names."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from segldm.data.sflckr import FlickrSegEval, FlickrSegTrain, SegmentationBase
from segldm.data.transforms import SampleError, smallest_side_size
from tests.compvis_fixtures import fixtures_dir
from tests.conftest import compose_train

FIXTURE = fixtures_dir() / "data"
FILES = FIXTURE / "files"
pytestmark = pytest.mark.skipif(
    not FIXTURE.is_dir(), reason=f"CompVis data fixture not at {FIXTURE} (SEGLDM_FIXTURES)"
)


@pytest.fixture(scope="module")
def expected() -> dict:
    return torch.load(FIXTURE / "expected.pt", map_location="cpu", weights_only=False)


def reference(size: int | None, random_crop: bool = False, **kwargs) -> SegmentationBase:
    return SegmentationBase(
        str(FILES / "list.txt"),
        str(FILES / "images"),
        str(FILES / "segmentations"),
        size,
        random_crop,
        **kwargs,
    )


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return np.round((image.numpy().astype(np.float64) + 1.0) * 127.5).astype(np.int64)


def windows(big: np.ndarray, small: np.ndarray) -> list[tuple[int, int]]:
    """Every (y, x) where `small` equals the same-size window of `big`."""
    h, w = small.shape[:2]
    return [
        (y, x)
        for y in range(big.shape[0] - h + 1)
        for x in range(big.shape[1] - w + 1)
        if np.array_equal(big[y : y + h, x : x + w], small)
    ]


@pytest.mark.parametrize("mode, size", [("eval", 32), ("nosize", None)])
def test_matches_the_reference_loader(expected, mode, size):
    ds = reference(size)
    assert len(ds) == 4 and ds.relative_paths == expected["relative_file_path_"]
    for i in range(len(ds)):
        sample = ds[i]
        want_image, want_labels = expected[f"{mode}/{i}/image"], expected[f"{mode}/{i}/segmentation_labels"]
        assert sample["image"].dtype == torch.float32 and sample["image"].shape == want_image.shape
        assert np.abs(to_uint8(sample["image"]) - to_uint8(want_image)).max() <= 2
        assert torch.equal(sample["label_map"].long(), want_labels)  # labels: exact
        seg = sample["segmentation"]
        assert seg.shape == (*want_labels.shape, 182) and seg.dtype == torch.float32
        assert torch.equal(seg.argmax(-1), want_labels) and torch.equal(
            seg.sum(-1), torch.ones(want_labels.shape)
        )
        assert sample["relative_file_path_"] == expected["relative_file_path_"][i]
        assert sample["segmentation_path_"].endswith(
            expected["relative_file_path_"][i].replace(".jpg", ".png")
        )


def test_rescale_uses_bankers_rounding_and_skips_scale_one(expected):
    """101x64 -> 50.5 rounds to 50 (Python round), 45x45 -> 32x32, and 32 -> no resize at all."""
    for i in range(4):
        h, w = expected[f"eval/{i}/decoded_uint8"].shape[:2]
        assert smallest_side_size(h, w, 32) == tuple(expected[f"eval/{i}/rescaled_uint8"].shape[:2])
    assert smallest_side_size(64, 101, 32) == (32, 50)
    assert smallest_side_size(32, 48, 32) is None


def test_random_crop_is_a_window_of_the_rescaled_image(expected):
    ds = reference(32, random_crop=True)
    offsets = set()
    for seed in range(12):
        random.seed(seed)
        for i in range(len(ds)):
            sample = ds[i]
            rescaled = expected[f"eval/{i}/rescaled_uint8"].numpy().astype(np.int64)
            labels = expected[f"eval/{i}/rescaled_segmentation"].numpy()
            image = to_uint8(sample["image"])
            assert image.shape == (32, 32, 3)
            found = windows(rescaled, image)
            assert found, f"sample {i}: crop is not a 32x32 window of the rescaled image"
            y, x = found[0]
            assert np.array_equal(sample["label_map"].numpy(), labels[y : y + 32, x : x + 32])
            if rescaled.shape[:2] != (32, 32):
                offsets.add((i, y, x))
    assert len({o for o in offsets if o[0] == 2}) > 1, "random crops should move"


def test_train_fixture_crops_have_the_reference_shape(expected):
    for i in range(4):
        assert expected[f"train_seed100+i/{i}/image"].shape == reference(32, True)[i]["image"].shape


def test_label_map_only_without_one_hot():
    sample = reference(32, one_hot=False)[0]
    assert "segmentation" not in sample
    assert sample["label_map"].dtype == torch.uint8 and sample["label_map"].shape == (32, 32)


def sflckr_root(
    tmp_path: Path, train_list: str = "sflckr_train.txt", eval_list: str = "sflckr_eval.txt"
) -> Path:
    root = tmp_path / "sflckr"
    shutil.copytree(FILES / "images", root / "images")
    shutil.copytree(FILES / "segmentations", root / "segmentations")
    lines = (FILES / "list.txt").read_text().splitlines()
    (root / train_list).write_text("\n".join(lines[:3]) + "\n")
    (root / eval_list).write_text(lines[3] + "\n")
    return root


def test_seed_config_names_and_file_list_keys(tmp_path, expected):
    root = sflckr_root(tmp_path, "my_train.txt", "my_eval.txt")
    train = FlickrSegTrain(size=32, root=str(root), file_list="my_train.txt")
    val = FlickrSegEval(size=32, root=str(root), file_list="my_eval.txt")
    assert (len(train), len(val), train.random_crop, val.random_crop) == (3, 1, True, False)
    assert torch.equal(val[0]["label_map"].long(), expected["eval/3/segmentation_labels"])
    with pytest.raises(
        FileNotFoundError, match=r"SFLCKR dataset not found at .*sflckr_train.txt \(file list missing"
    ):
        FlickrSegTrain(size=32, root=str(root))


def test_data_config_serves_label_maps(tmp_path, expected):
    root = sflckr_root(tmp_path)
    cfg = compose_train(
        [
            "data=sflckr",
            f"data.root={root}",
            "data.size=32",
            "data.batch_size=2",
            "data.num_workers=0",
            "data.persistent_workers=false",
            "data.pin_memory=false",
            "paths.output_dir=/tmp/unused",
        ]
    )
    dm = instantiate(cfg.data)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) >= {"image", "label_map", "relative_file_path_"} and "segmentation" not in batch
    assert batch["image"].shape == (2, 32, 32, 3) and batch["label_map"].dtype == torch.uint8
    val = next(iter(dm.val_dataloader()))
    assert torch.equal(val["label_map"][0].long(), expected["eval/3/segmentation_labels"])
    dm_ref = instantiate(
        compose_train(
            [
                "data=sflckr",
                f"data.root={root}",
                "data.size=32",
                "data.one_hot_in_loader=true",
                "paths.output_dir=/tmp/unused",
            ]
        ).data
    )
    assert dm_ref.val_dataset[0]["segmentation"].shape == (32, 32, 182)


def test_label_out_of_range_is_named():
    with pytest.raises(
        SampleError, match=r"img0.png: label ids 66 \(\d+ px\).*outside \[0, data.n_labels=60\)"
    ):
        reference(32, n_labels=60)[0]
