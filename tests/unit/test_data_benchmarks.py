"""The benchmark presets (data=ade20k, cocostuff, cityscapes, celebamask_hq) on tiny copies of each
dataset in its official layout, written here: exact label maps (and instance maps) against values
computed in the test from the published rules, geometry, every bad input, and data.check on each.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from PIL import Image
from rich.console import Console

from segldm.data.check import run_check
from segldm.data.transforms import SampleError, collate_samples
from tests.conftest import CONF, REPO, compose_train

RNG = np.random.default_rng(0)
LOADER = ["data.num_workers=0", "data.persistent_workers=false", "data.pin_memory=false", "data.batch_size=2"]


def blocks(h: int, w: int, values: np.ndarray, seed: int, block: int = 3) -> np.ndarray:
    """An h x w map of `values` drawn in block x block squares (survives no resampling, exact as stored)."""
    rng = np.random.default_rng(seed)
    coarse = rng.choice(values, size=(-(-h // block), -(-w // block)))
    return np.kron(coarse, np.ones((block, block), dtype=np.int64))[:h, :w]


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def photo(h: int, w: int) -> np.ndarray:
    return RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def nearest(ids: np.ndarray, width: int, height: int) -> np.ndarray:
    """PIL's nearest resize, as SPADE resizes label and instance maps (Image.NEAREST)."""
    return np.asarray(Image.fromarray(ids.astype(np.int32)).resize((width, height), Image.NEAREST))


def build(preset: str, root: Path | None, *overrides: str):
    at = [] if root is None else [f"data.root={root}"]
    return instantiate(compose_train([f"data={preset}", *at, *LOADER, *overrides]).data)


def fails(pattern: str, preset: str, root: Path | None, *overrides: str) -> None:
    """Building the preset raises an error (unwrapped from Hydra's) whose message matches `pattern`."""
    with pytest.raises(Exception) as info:
        build(preset, root, *overrides)
    err = info.value
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    assert re.search(pattern, str(err)), f"{pattern!r} not in:\n{err}"


def check_output(preset: str, root: Path, *overrides: str) -> tuple[int, str]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("check", [f"data={preset}", f"data.root={root}", "workers=0", *overrides])
    console = Console(record=True, width=250)
    errors = run_check(cfg, console)
    return errors, console.export_text()


# ---------------------------------------------------------------------------- ADE20K
ADE_SIZES = {"training": [(23, 37), (30, 29)], "validation": [(41, 19)]}


def make_ade(root: Path) -> dict[str, np.ndarray]:
    """ADEChallengeData2016 with odd-sized images; returns {relative path: stored ids}."""
    stored = {}
    for split, sizes in ADE_SIZES.items():
        for i, (h, w) in enumerate(sizes):
            name = f"ADE_{'train' if split == 'training' else 'val'}_{i + 1:08d}"
            ids = blocks(h, w, np.array([0, 1, 2, 75, 149, 150]), seed=i + len(split))
            save(root / "ADEChallengeData2016/images" / split / f"{name}.jpg", photo(h, w))
            save(root / "ADEChallengeData2016/annotations" / split / f"{name}.png", ids.astype(np.uint8))
            stored[f"{split}/{name}"] = ids
    return stored


def ade_channels(ids: np.ndarray) -> np.ndarray:
    """SPADE data/ade20k_dataset.py: label - 1, and 'other' (0) -> label_nc = 150."""
    return np.where(ids == 0, 150, ids - 1)


def test_ade20k_native_labels_follow_spade(tmp_path):
    stored = make_ade(tmp_path)
    dm = build("ade20k", tmp_path, "data.size=null", "data.flip=false")  # the folder holding it is accepted
    assert dm.n_labels == 151 and len(dm.train_dataset) == 2 and len(dm.val_dataset) == 1
    for ds, split in ((dm.train_dataset, "training"), (dm.val_dataset, "validation")):
        for i, pair in enumerate(ds.pairs):
            sample = ds[i]
            want = ade_channels(stored[f"{split}/{Path(pair.relative).stem}"])
            assert sample["label_map"].shape == want.shape == sample["image"].shape[:2]
            assert np.array_equal(sample["label_map"].numpy(), want)
            assert "instance_map" not in sample


def test_ade20k_geometry_stretch_crop_and_flip(tmp_path):
    stored = make_ade(tmp_path)
    dm = build("ade20k", tmp_path / "ADEChallengeData2016", "data.size=16")
    val = dm.val_dataset[0]
    want = nearest(ade_channels(stored["validation/ADE_val_00000001"]), 16, 16)
    assert val["image"].shape == (16, 16, 3) and np.array_equal(val["label_map"].numpy(), want)
    # train: stretched to round(16 * 286/256) = 18, a random 16x16 window of it, maybe flipped
    loaded = nearest(ade_channels(stored["training/ADE_train_00000001"]), 18, 18).astype(np.uint8)
    windows = {loaded[y : y + 16, x : x + 16].tobytes() for y in range(3) for x in range(3)}
    windows |= {
        np.ascontiguousarray(w[:, ::-1]).tobytes()
        for w in [loaded[y : y + 16, x : x + 16] for y in range(3) for x in range(3)]
    }
    for seed in range(6):
        random.seed(seed)
        assert dm.train_dataset[0]["label_map"].numpy().tobytes() in windows


# ---------------------------------------------------------------------------- COCO-Stuff
def make_coco(root: Path, instances: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """COCO 2017 photos + stuffthingmaps + SPADE-style 8-bit instance maps: {key: (ids, instances)}."""
    stored = {}
    for split, sizes in (("train2017", [(17, 26), (25, 19)]), ("val2017", [(20, 31)])):
        for i, (h, w) in enumerate(sizes):
            key = f"{100 + i + len(split):012d}"
            ids = blocks(h, w, np.array([0, 5, 90, 181, 255]), seed=i)
            inst = blocks(h, w, np.arange(7), seed=i + 10)
            save(root / split / f"{key}.jpg", photo(h, w))
            save(root / "stuffthingmaps_trainval2017" / split / f"{key}.png", ids.astype(np.uint8))
            if instances:
                save(root / "instances" / split / f"{key}.png", inst.astype(np.uint8))
            stored[f"{split}/{key}"] = (ids, inst)
    return stored


def test_cocostuff_labels_and_instance_maps(tmp_path):
    stored = make_coco(tmp_path)
    dm = build(
        "cocostuff",
        tmp_path,
        "data.size=null",
        "data.flip=false",
        "data.instance_edges=true",
        f"data.train_instances={tmp_path}/instances/train2017",
        f"data.val_instances={tmp_path}/instances/val2017",
    )
    assert dm.n_labels == 183 and len(dm.train_dataset) == 2
    for ds, split in ((dm.train_dataset, "train2017"), (dm.val_dataset, "val2017")):
        for i, pair in enumerate(ds.pairs):
            ids, inst = stored[f"{split}/{Path(pair.relative).stem}"]
            sample = ds[i]
            want = np.where(ids == 255, 182, ids)  # SPADE pix2pix_dataset.py: 255 -> label_nc
            assert np.array_equal(sample["label_map"].numpy(), want)
            assert sample["instance_map"].dtype == torch.int32 and np.array_equal(
                sample["instance_map"].numpy(), inst
            )
    without = build("cocostuff", tmp_path, "data.size=null")  # default: no instance maps read
    assert "instance_map" not in without.train_dataset[0]


def test_cocostuff_instance_edges_need_the_instance_folders(tmp_path):
    make_coco(tmp_path, instances=False)
    fails(
        r"data.instance_edges=true but data.train_instances is null",
        "cocostuff",
        tmp_path,
        "data.instance_edges=true",
    )


# ---------------------------------------------------------------------------- Cityscapes
# labelIds: unlabeled, ego vehicle, road, sidewalk, building, vegetation, sky, person, car, bicycle
CITY_IDS = np.array([0, 1, 7, 8, 11, 21, 23, 24, 26, 33])
HAS_INSTANCES = {24, 25, 26, 27, 28, 29, 30, 31, 32, 33}  # person ... bicycle


def make_cityscapes(root: Path, h: int = 10, w: int = 20) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """leftImg8bit + gtFine (labelIds 8 bit, instanceIds 16 bit: id x 1000 + k for instance classes)."""
    stored = {}
    for split, names in (
        ("train", ["aachen_000000_000019", "bremen_000003_000019"]),
        ("val", ["lindau_000000_000019"]),
    ):
        for i, name in enumerate(names):
            city = name.split("_")[0]
            ids = blocks(h, w, CITY_IDS, seed=i + len(split), block=2)
            k = blocks(h, w, np.arange(3), seed=i + 20, block=2)
            inst = np.where(np.isin(ids, list(HAS_INSTANCES)), ids * 1000 + k, ids)
            save(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", photo(h, w))
            save(root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png", ids.astype(np.uint8))
            save(root / "gtFine" / split / city / f"{name}_gtFine_instanceIds.png", inst.astype(np.uint16))
            save(root / "gtFine" / split / city / f"{name}_gtFine_color.png", photo(h, w))  # not read
            stored[f"{split}/{city}/{name}"] = (ids, inst)
    return stored


def test_cityscapes_label_ids_instances_and_train_ids(tmp_path):
    stored = make_cityscapes(tmp_path)
    dm = build("cityscapes", tmp_path, "data.size=null", "data.flip=false", "data.instance_edges=true")
    assert dm.n_labels == 35 and [p.relative for p in dm.train_dataset.pairs] == [
        "aachen/aachen_000000_000019_leftImg8bit.png",
        "bremen/bremen_000003_000019_leftImg8bit.png",
    ]
    for ds, split in ((dm.train_dataset, "train"), (dm.val_dataset, "val")):
        for i, pair in enumerate(ds.pairs):
            ids, inst = stored[f"{split}/{pair.relative[: -len('_leftImg8bit.png')]}"]
            sample = ds[i]
            assert np.array_equal(sample["label_map"].numpy(), ids)  # SPADE: labelIds are the channels
            assert np.array_equal(sample["instance_map"].numpy(), inst)
    batch = collate_samples([dm.val_dataset[0], dm.val_dataset[0]])
    assert batch["instance_map"].shape == (2, 10, 20) and batch["instance_map"].dtype == torch.int32
    # the 19 evaluated classes: road 7 -> 0, sidewalk 8 -> 1, building 11 -> 2, vegetation 21 -> 8, sky 23 -> 10,
    # person 24 -> 11, car 26 -> 13, bicycle 33 -> 18; unlabeled 0 and ego vehicle 1 -> ignored (255)
    train_ids = {0: 255, 1: 255, 7: 0, 8: 1, 11: 2, 21: 8, 23: 10, 24: 11, 26: 13, 33: 18}
    dm = build("cityscapes", tmp_path, "data.size=null", "data.label_encoding=trainId", "data.n_labels=19",
               "data.ignore_label=255")  # fmt: skip
    ids = stored["val/lindau/lindau_000000_000019"][0]
    assert np.array_equal(dm.val_dataset[0]["label_map"].numpy(), np.vectorize(train_ids.get)(ids))
    assert dm.val_dataset.class_names[13] == "car"


def test_cityscapes_512x256_window_moves_labels_and_instances_together(tmp_path):
    stored = make_cityscapes(tmp_path, h=12, w=24)
    dm = build("cityscapes", tmp_path, "data.size=8", "data.instance_edges=true")  # 16x8 (aspect 2)
    ids, inst = stored["train/aachen/aachen_000000_000019"]
    want_ids, want_inst = nearest(ids, 16, 8), nearest(inst, 16, 8)
    flips = set()
    for seed in range(8):
        random.seed(seed)
        sample = dm.train_dataset[0]
        assert sample["image"].shape == (8, 16, 3)
        labels, instances = sample["label_map"].numpy(), sample["instance_map"].numpy()
        flipped = not np.array_equal(labels, want_ids)
        flips.add(flipped)
        if flipped:
            labels, instances = labels[:, ::-1], instances[:, ::-1]
        assert np.array_equal(labels, want_ids) and np.array_equal(instances, want_inst)
    assert flips == {False, True}


# ---------------------------------------------------------------------------- CelebAMask-HQ
# g_mask.py's label_list (CelebAMask-HQ face_parsing/Data_preprocessing), part i -> label i + 1
PARTS = [
    "skin",
    "nose",
    "eye_g",
    "l_eye",
    "r_eye",
    "l_brow",
    "r_brow",
    "l_ear",
    "r_ear",
    "mouth",
    "u_lip",
    "l_lip",
]
PARTS += ["hair", "hat", "ear_r", "neck_l", "neck", "cloth"]


def make_celeba(root: Path, faces=(0, 1, 2001, 28000), mask: int = 12) -> dict[int, np.ndarray]:
    """CelebA-HQ-img (2x the masks' size) + per-part masks; returns {face: merged labels} per g_mask.py."""
    merged = {}
    for face in faces:
        save(root / "CelebAMask-HQ/CelebA-HQ-img" / f"{face}.jpg", photo(2 * mask, 2 * mask))
        labels = np.zeros((mask, mask), dtype=np.int64)
        rng = np.random.default_rng(face)
        for index, part in enumerate(PARTS):
            if rng.random() < 0.4:
                continue  # a face has only some parts
            region = np.zeros((mask, mask), dtype=np.uint8)
            y, x = rng.integers(0, mask - 4, size=2)
            region[y : y + 5, x : x + 6] = 255
            save(
                root / "CelebAMask-HQ/CelebAMask-HQ-mask-anno" / str(face // 2000) / f"{face:05d}_{part}.png",
                region,
            )
            labels[region != 0] = index + 1  # later parts overwrite
        merged[face] = labels
    return merged


def test_celebamask_hq_merges_parts_and_splits_as_sean(tmp_path):
    merged = make_celeba(tmp_path)
    dm = build("celebamask_hq", tmp_path, "data.size=null", "data.flip=false")
    assert [p.relative for p in dm.train_dataset.pairs] == ["0.jpg", "1.jpg", "2001.jpg"]
    assert [p.relative for p in dm.val_dataset.pairs] == ["28000.jpg"]
    for ds in (dm.train_dataset, dm.val_dataset):
        for i, pair in enumerate(ds.pairs):
            sample = ds[i]
            assert sample["image"].shape == (12, 12, 3)  # the 24x24 photo reduced to the masks' size
            assert np.array_equal(sample["label_map"].numpy(), merged[int(pair.relative[:-4])])
    image = np.asarray(Image.open(tmp_path / "CelebAMask-HQ/CelebA-HQ-img/0.jpg")).astype(np.float64)
    box = image.reshape(12, 2, 12, 2, 3).mean(axis=(1, 3))  # 2x2 box average
    got = (dm.train_dataset[0]["image"].numpy().astype(np.float64) + 1) * 127.5
    assert np.abs(got - box).max() <= 1.0
    dm = build("celebamask_hq", tmp_path / "CelebAMask-HQ", "data.size=8")
    assert dm.val_dataset[0]["label_map"].shape == (8, 8)


def test_celebamask_hq_celeba_partition(tmp_path):
    make_celeba(tmp_path, faces=(0, 1, 2))
    (tmp_path / "CelebAMask-HQ/CelebA-HQ-to-CelebA-mapping.txt").write_text(
        "idx orig_idx orig_file\n0 119613 119614.jpg\n1 170000 170001.jpg\n2 190000 190001.jpg\n"
    )
    dm = build(
        "celebamask_hq", tmp_path, "data.split_protocol=celeba", "data.val_split=val", "data.size=null"
    )
    assert [p.relative for p in dm.train_dataset.pairs] == ["0.jpg"]
    assert [p.relative for p in dm.val_dataset.pairs] == ["1.jpg"]


# ---------------------------------------------------------------------------- bad input
def test_a_root_that_is_not_the_layout_names_the_expected_folder(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    cases = [
        (
            "ade20k",
            r"is not the ADE20K \(ADEChallengeData2016\) layout: expected the folder .*elsewhere/images",
        ),
        ("cocostuff", r"is not the COCO-Stuff layout: expected the folder .*elsewhere/train2017"),
        ("cityscapes", r"is not the Cityscapes layout: expected the folder .*elsewhere/leftImg8bit"),
        ("celebamask_hq", r"is not the CelebAMask-HQ layout: expected the folder .*elsewhere/CelebA-HQ-img"),
    ]
    for preset, pattern in cases:
        fails(pattern, preset, tmp_path / "elsewhere")
    fails(r"data.root=.*absent does not exist", "ade20k", tmp_path / "absent")


def test_a_missing_split_folder_is_named(tmp_path):
    make_ade(tmp_path)
    root = tmp_path / "ADEChallengeData2016"
    for path in (root / "annotations/validation").iterdir():
        path.unlink()
    (root / "annotations/validation").rmdir()
    fails(r"folder .*annotations/validation \(the validation label maps\) is missing", "ade20k", root)


def test_images_without_labels_and_labels_without_images_are_counted(tmp_path):
    make_ade(tmp_path)
    root = tmp_path / "ADEChallengeData2016"
    (root / "annotations/training/ADE_train_00000001.png").unlink()
    (root / "images/training/ADE_train_00000002.jpg").unlink()
    save(root / "annotations/training/ADE_train_00000009.png", np.ones((5, 5), np.uint8))
    fails((
        r"3 file\(s\) missing:\n  .*ADE_train_00000001.png \(mask of ADE_train_00000001.jpg\)\n"
        r"  .*images/training/ADE_train_00000002.jpg \(image of ADE_train_00000002.jpg\)\n"
        r"  .*images/training/ADE_train_00000009.jpg \(image of ADE_train_00000009.jpg\)\n"
        r"\(1 mask, 2 images missing\)"
    ), "ade20k", root)  # fmt: skip


def test_ids_outside_the_dataset_are_refused_naming_file_and_ids(tmp_path):
    make_ade(tmp_path)
    path = tmp_path / "ADEChallengeData2016/annotations/validation/ADE_val_00000001.png"
    ids = np.asarray(Image.open(path)).copy()
    ids[0, :2] = 151
    save(path, ids)
    ds = build("ade20k", tmp_path, "data.size=null").val_dataset
    with pytest.raises(
        SampleError,
        match=r"ADE_val_00000001.png: label ids 151 \(2 px\) are not data=ade20k ids \(ids 0-150\)",
    ):
        ds[0]
    make_coco(tmp_path / "coco")
    path = (
        tmp_path
        / "coco/stuffthingmaps_trainval2017/val2017"
        / os.listdir(tmp_path / "coco/val2017")[0].replace(".jpg", ".png")
    )
    ids = np.asarray(Image.open(path)).copy()
    ids[0, 0], ids[1, 1] = 182, 254  # COCO-Stuff has no ids 182..254
    save(path, ids)
    ds = build("cocostuff", tmp_path / "coco", "data.size=null").val_dataset
    with pytest.raises(
        SampleError,
        match=r"label ids 182 \(1 px\), 254 \(1 px\) are not data=cocostuff ids \(ids 0-181, 255\)",
    ):
        ds[0]


def test_a_face_without_part_files_is_named(tmp_path):
    make_celeba(tmp_path, faces=(0, 1))
    for path in (tmp_path / "CelebAMask-HQ/CelebAMask-HQ-mask-anno/0").glob("00001_*.png"):
        path.unlink()
    fails(r"1 file\(s\) missing:\n  .*CelebAMask-HQ-mask-anno/0/00001_\*.png \(part masks of 1.jpg\)",
          "celebamask_hq", tmp_path)  # fmt: skip


def test_an_instance_file_of_the_wrong_type_is_refused(tmp_path):
    stored = make_cityscapes(tmp_path)
    ids, _ = stored["val/lindau/lindau_000000_000019"]
    bad = tmp_path / "gtFine/val/lindau/lindau_000000_000019_gtFine_instanceIds.png"
    save(bad, ids.astype(np.uint8))  # 8 bit: e.g. the labelIds file copied over it
    ds = build("cityscapes", tmp_path, "data.size=null", "data.instance_edges=true").val_dataset
    with pytest.raises(SampleError, match=r"instanceIds.png: instance map has mode 'L', not a 16-bit id map"):
        ds[0]
    save(bad, np.zeros((10, 20, 3), np.uint8))
    with pytest.raises(SampleError, match=r"instance map has mode 'RGB'"):
        ds[0]


def test_instance_edges_on_a_dataset_without_instances_is_refused(tmp_path):
    make_ade(tmp_path)
    make_celeba(tmp_path, faces=(0,))
    fails(r"data=ade20k: data.instance_edges=true, but ADE20K .* has no instance maps", "ade20k", tmp_path,
          "data.instance_edges=true")  # fmt: skip
    fails(r"data=celebamask_hq: data.instance_edges=true, but CelebAMask-HQ has no", "celebamask_hq", tmp_path,
          "data.instance_edges=true")  # fmt: skip
    fails(r"data.instance_edges=True but data.train \(SyntheticScenes\) yields no instance maps", "synthetic",
          None, "data.instance_edges=true")  # fmt: skip


# ---------------------------------------------------------------------------- data.check
def test_data_check_passes_on_each_clean_preset(tmp_path):
    make_ade(tmp_path / "ade")
    make_coco(tmp_path / "coco")
    make_cityscapes(tmp_path / "city")
    make_celeba(tmp_path / "celeba")
    for preset, root, extra in (
        ("ade20k", "ade", []),
        ("cocostuff", "coco", ["data.instance_edges=true", f"data.train_instances={tmp_path}/coco/instances/train2017",
                               f"data.val_instances={tmp_path}/coco/instances/val2017"]),
        ("cityscapes", "city", ["data.instance_edges=true"]),
        ("celebamask_hq", "celeba", []),
    ):  # fmt: skip
        for mode in ("full", "headers"):
            errors, text = check_output(preset, tmp_path / root, f"mode={mode}", *extra)
            assert errors == 0, f"{preset} {mode}:\n{text}"
            assert "OK" in text
    errors, text = check_output("celebamask_hq", tmp_path / "celeba")
    assert "hair" in text  # class names in the histogram


def test_data_check_reports_every_bad_file_of_a_preset(tmp_path):
    stored = make_cityscapes(tmp_path)
    gt = tmp_path / "gtFine/train/aachen"
    save(gt / "aachen_000000_000019_gtFine_instanceIds.png", np.zeros((10, 20), np.uint8))  # wrong type
    ids = stored["train/bremen/bremen_000003_000019"][0].astype(np.uint8)
    ids[0, 0] = 40  # no Cityscapes label id
    save(tmp_path / "gtFine/train/bremen/bremen_000003_000019_gtFine_labelIds.png", ids)
    save(gt / "aachen_000009_000019_gtFine_labelIds.png", ids)  # a label map without its image
    errors, text = check_output("cityscapes", tmp_path, "data.instance_edges=true")
    assert errors == 3, text
    assert (
        "aachen_000009_000019_leftImg8bit.png (image of aachen/aachen_000009_000019_leftImg8bit.png)" in text
    )
    assert "instance map has mode 'L'" in text and "label ids 40 (1 px) are not data=cityscapes ids" in text
    errors, text = check_output("cityscapes", tmp_path, "data.instance_edges=true", "mode=headers")
    assert errors == 2 and "instance map has mode 'L'" in text, text  # headers: no labels read


def test_data_check_cli_exit_status(tmp_path):
    make_celeba(tmp_path, faces=(0, 28000))
    (tmp_path / "CelebAMask-HQ/CelebA-HQ-img/0.jpg").unlink()  # parts without their photo
    env = {**os.environ, "SEGLDM_ROOT": str(tmp_path), "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "segldm.data.check", "data=celebamask_hq", f"data.root={tmp_path}", "workers=0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "CelebA-HQ-img/0.jpg (image of 0.jpg)" in proc.stdout
