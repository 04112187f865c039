"""`data=folder`: pairing, file modes, remaps, ignore label, flips, crops, and every bad input.

Files are made here (tmp_path) with PIL/numpy: small images, exact expectations.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from segldm.condition import one_hot_from_label_map
from segldm.data.datamodule import SegmentationDataModule
from segldm.data.folder import FolderSegmentation
from segldm.data.transforms import (
    INTERPOLATIONS,
    SampleError,
    SkippedSample,
    collate_samples,
    resize_smallest_side,
)
from segldm.training.ldm import LatentDiffusion
from tests.conftest import TINY_FIRST_STAGE, TINY_UNET, compose_train

PALETTE = np.random.default_rng(0).integers(0, 256, size=(512, 3)).astype(np.uint8)


def blocky_labels(h: int, w: int, n_labels: int, seed: int, block: int = 4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, n_labels, size=(-(-h // block), -(-w // block)))
    return np.kron(coarse, np.ones((block, block), dtype=np.int64))[:h, :w]


def write_pair(
    root: Path,
    rel: str,
    labels: np.ndarray,
    *,
    image_ext: str = ".png",
    mask_dir: str = "masks",
    mask_mode: str = "L",
) -> tuple[Path, Path]:
    """Image = the palette colour of each pixel's label (PNG: lossless), mask = the labels."""
    image = root / "images" / f"{rel}{image_ext}"
    image.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(PALETTE[labels % len(PALETTE)]).save(image)
    return image, write_mask(root / mask_dir / f"{rel}.png", labels, mask_mode)


def write_mask(mask: Path, labels: np.ndarray, mode: str = "L") -> Path:
    mask.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray(labels.astype(np.uint16)).save(mask)
    else:
        Image.fromarray(labels.astype(np.uint8)).convert(mode).save(mask)
    return mask


def make_dataset(root: Path, n: int = 5, h: int = 24, w: int = 40, n_labels: int = 6) -> list[str]:
    rels = [f"scene{i // 3}/img{i}" for i in range(n)]
    for i, rel in enumerate(rels):
        write_pair(root, rel, blocky_labels(h, w, n_labels, seed=i))
    return rels


def folder(root: Path, **kwargs) -> FolderSegmentation:
    kwargs = {"n_labels": 6, "size": None, **kwargs}
    return FolderSegmentation(str(root / "images"), str(root / "masks"), **kwargs)


def assert_aligned(sample: dict) -> None:
    """Every image pixel is its label's palette colour: image and mask were transformed together."""
    image = np.round((sample["image"].numpy().astype(np.float64) + 1) * 127.5).astype(np.uint8)
    assert np.array_equal(image, PALETTE[sample["label_map"].numpy().astype(np.int64)])


# ---------------------------------------------------------------------------- pairing and format
def test_scans_nested_folders_and_serves_reference_keys(tmp_path):
    rels = make_dataset(tmp_path)
    ds = folder(tmp_path, size=16)
    assert [p.relative for p in ds.pairs] == sorted(f"{r}.png" for r in rels)
    sample = ds[0]
    assert sample["image"].shape == (16, 16, 3) and sample["image"].dtype == torch.float32
    assert sample["label_map"].shape == (16, 16) and sample["label_map"].dtype == torch.uint8
    assert sample["segmentation"].shape == (16, 16, 6)
    assert torch.equal(sample["segmentation"].argmax(-1), sample["label_map"].long())
    labels = blocky_labels(24, 40, 6, seed=0)
    want = resize_smallest_side(labels.astype(np.uint8), 16, INTERPOLATIONS["nearest"])
    y, x = (want.shape[0] - 16) // 2, (want.shape[1] - 16) // 2  # centre crop
    assert np.array_equal(sample["label_map"].numpy(), want[y : y + 16, x : x + 16])
    assert "segmentation" not in folder(tmp_path, size=16, one_hot=False)[0]


def test_file_list_with_single_paths_tab_pairs_and_comments(tmp_path):
    make_dataset(tmp_path, n=3)
    (tmp_path / "masks/odd").mkdir()
    (tmp_path / "masks/scene0/img1.png").rename(tmp_path / "masks/odd/name.png")
    listing = tmp_path / "train.txt"
    listing.write_text("# my split\nscene0/img0.png\n\nscene0/img1.png\todd/name.png\n")
    ds = folder(tmp_path, file_list=str(listing))
    assert [(p.relative, p.mask.name) for p in ds.pairs] == [
        ("scene0/img0.png", "img0.png"),
        ("scene0/img1.png", "name.png"),
    ]
    assert np.array_equal(ds[1]["label_map"].numpy(), blocky_labels(24, 40, 6, seed=1))


def test_cityscapes_suffixes_and_list_remap(tmp_path):
    ids = np.array([[7, 8, 26, 0], [33, 7, 7, 1]], dtype=np.uint8).repeat(4, 0).repeat(4, 1)
    city = tmp_path / "images" / "aachen"
    city.mkdir(parents=True)
    Image.fromarray(PALETTE[ids]).save(city / "aachen_000000_000019_leftImg8bit.png")
    (tmp_path / "masks" / "aachen").mkdir(parents=True)
    Image.fromarray(ids).save(tmp_path / "masks/aachen/aachen_000000_000019_gtFine_labelIds.png")
    Image.fromarray(ids).save(tmp_path / "masks/aachen/aachen_000000_000019_gtFine_color.png")  # ignored
    remap = [255] * 7 + [0, 1, 255, 255, 2, 3, 4, 255, 255, 255, 5, 255, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    remap += [255, 255, 16, 17, 18]
    ds = folder(
        tmp_path,
        n_labels=19,
        ignore_label=255,
        label_remap=remap,
        image_suffix="_leftImg8bit.png",
        mask_suffix="_gtFine_labelIds.png",
    )
    assert len(ds) == 1
    sample = ds[0]
    want = np.array([[0, 1, 13, 255], [18, 0, 0, 255]], dtype=np.uint8).repeat(4, 0).repeat(4, 1)
    assert np.array_equal(sample["label_map"].numpy(), want)
    ignored = torch.from_numpy(want == 255)
    assert torch.equal(sample["segmentation"].sum(-1), (~ignored).float())  # ignore -> all-zero vector


def test_dict_remap_keeps_unmapped_ids_and_list_remap_refuses_unknown_ids(tmp_path):
    write_pair(tmp_path, "a", np.array([[0, 1], [2, 3]]).repeat(4, 0).repeat(4, 1))
    ds = folder(tmp_path, n_labels=4, ignore_label=255, label_remap={0: 255, 3: 0})
    assert np.unique(ds[0]["label_map"].numpy()).tolist() == [0, 1, 2, 255]
    with pytest.raises(SampleError, match=r"a.png: label ids \[2, 3\] have no entry in data.label_remap"):
        folder(tmp_path, n_labels=4, label_remap=[1, 0])[0]
    with pytest.raises(ValueError, match=r"data.label_remap maps to \[9\], outside \[0, data.n_labels=4\)"):
        folder(tmp_path, n_labels=4, label_remap={1: 9})


def test_image_modes_grey_palette_rgba_16bit(tmp_path):
    labels = blocky_labels(8, 8, 4, seed=1)
    (tmp_path / "images").mkdir()
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(grey).save(tmp_path / "images/grey.jpg", quality=100)
    Image.fromarray(PALETTE[labels]).quantize(8).save(tmp_path / "images/palette.png")
    rgba = np.dstack([PALETTE[labels], np.full((8, 8), 7, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "images/rgba.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "images/deep.png")
    for name in ("grey", "palette", "rgba", "deep"):
        write_mask(tmp_path / f"masks/{name}.png", labels)
    ds = folder(tmp_path, n_labels=4)
    images = {p.relative: np.round((ds[i]["image"].numpy() + 1) * 127.5) for i, p in enumerate(ds.pairs)}
    assert all(im.shape == (8, 8, 3) for im in images.values())
    assert np.abs(images["grey.jpg"] - grey[..., None]).max() <= 2  # grey -> RGB, channels equal
    assert np.array_equal(images["rgba.png"], PALETTE[labels])  # alpha dropped
    assert np.array_equal(images["deep.png"], np.repeat(grey[..., None], 3, 2))  # 16-bit scaled, not clipped
    palette_image = np.asarray(Image.open(tmp_path / "images/palette.png").convert("RGB"))
    assert np.array_equal(images["palette.png"], palette_image)


def test_mask_modes_palette_16bit_and_grey_rgb(tmp_path):
    labels = blocky_labels(8, 12, 300, seed=2)
    write_pair(tmp_path, "deep", labels, mask_mode="I;16")
    ds = folder(tmp_path, n_labels=300)
    assert ds[0]["label_map"].dtype == torch.int16
    assert np.array_equal(ds[0]["label_map"].numpy(), labels)

    small = blocky_labels(8, 12, 5, seed=3)
    for mode in ("P", "RGB", "LA"):
        write_pair(tmp_path / mode, "x", small, mask_mode=mode)
        assert np.array_equal(folder(tmp_path / mode, n_labels=5)[0]["label_map"].numpy(), small), mode
    write_pair(tmp_path / "colour", "x", small)
    Image.fromarray(PALETTE[small]).save(tmp_path / "colour/masks/x.png")
    with pytest.raises(SampleError, match="x.png: mask is a colour-coded RGB image"):
        folder(tmp_path / "colour", n_labels=5)[0]


def test_flip_moves_image_and_mask_together_train_only(tmp_path):
    make_dataset(tmp_path, n=1)
    plain = folder(tmp_path)[0]
    ds = folder(tmp_path, flip=True)
    flipped = 0
    for seed in range(16):
        random.seed(seed)
        sample = ds[0]
        assert_aligned(sample)
        if torch.equal(sample["label_map"], plain["label_map"].flip(1)):
            flipped += 1
        else:
            assert torch.equal(sample["label_map"], plain["label_map"])
    assert 0 < flipped < 16


def test_random_crop_is_a_window_of_the_rescaled_pair(tmp_path):
    make_dataset(tmp_path, n=1, h=24, w=40)
    ds = folder(tmp_path, size=16, random_crop=True, flip=True)
    labels = resize_smallest_side(
        blocky_labels(24, 40, 6, seed=0).astype(np.uint8), 16, INTERPOLATIONS["nearest"]
    )
    offsets = set()
    for seed in range(20):
        random.seed(seed)
        lm = ds[0]["label_map"].numpy()
        candidates = {lm.tobytes(): False, lm[:, ::-1].tobytes(): True}
        found = [x for x in range(labels.shape[1] - 15) if labels[:, x : x + 16].tobytes() in candidates]
        assert found, "crop is not a 16x16 window of the rescaled mask"
        offsets.add(found[0])
    assert len(offsets) > 1


def test_ignore_label_conditions_on_zero_vector_in_the_model(tmp_path):
    labels = blocky_labels(8, 8, 3, seed=4)
    labels[:4, :4] = 255
    write_pair(tmp_path, "a", labels)
    ds = folder(tmp_path, n_labels=3, ignore_label=255)
    batch = collate_samples([ds[0], ds[0]])
    model = tiny_ldm(n_labels=3, ignore_label=255)
    from_labels = model.get_input({"label_map": batch["label_map"]}, "segmentation")
    from_one_hot = model.get_input({"segmentation": batch["segmentation"]}, "segmentation")
    assert from_labels.shape == (2, 3, 8, 8) and from_labels.dtype == torch.float32
    assert torch.equal(from_labels, from_one_hot)
    assert torch.equal(from_labels[:, :, :4, :4], torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"label_map holds ids \[255\] outside \[0, 3\)"):
        tiny_ldm(n_labels=3, ignore_label=None).get_input({"label_map": batch["label_map"]}, "segmentation")


def test_device_one_hot_equals_f_one_hot_permute_float():
    ids = torch.randint(0, 7, (3, 5, 6), dtype=torch.uint8)
    want = torch.nn.functional.one_hot(ids.long(), 7).permute(0, 3, 1, 2).float()
    assert torch.equal(one_hot_from_label_map(ids, 7), want)
    ids[0, 0, 0] = 200
    want[0, :, 0, 0] = 0
    got = one_hot_from_label_map(ids.to(torch.int16), 7, ignore_label=200)
    assert torch.equal(got, want) and got.dtype == torch.float32


def tiny_ldm(n_labels: int, ignore_label: int | None) -> LatentDiffusion:
    cfg = compose_train(
        [
            "data.size=32",
            f"data.n_labels={n_labels}",
            f"data.ignore_label={ignore_label if ignore_label is not None else 'null'}",
            *TINY_FIRST_STAGE,
            *TINY_UNET,
            "model.first_stage.ckpt_path=null",
            "model.require_pretrained_first_stage=false",
            "paths.output_dir=/tmp/unused",
        ]
    )
    return instantiate(cfg.model)


# ---------------------------------------------------------------------------- bad input
def break_dataset(root: Path, problem: str) -> str:
    """Five good pairs, then break the one at scene1/img3 as `problem`; returns its name in errors."""
    make_dataset(root)
    image, mask = root / "images/scene1/img3.png", root / "masks/scene1/img3.png"
    if problem == "corrupt image":
        image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
        return r"scene1/img3.png: image file is corrupt or truncated"
    if problem == "truncated image":
        data = image.read_bytes()
        image.write_bytes(data[: len(data) // 2])
        return r"scene1/img3.png: image file is corrupt or truncated.*truncated"
    if problem == "missing mask":
        mask.unlink()
        return r"1 file\(s\) missing:\n  .*masks/scene1/img3.png \(mask of scene1/img3.png\)"
    if problem == "size mismatch":
        Image.fromarray(blocky_labels(20, 40, 6, seed=3).astype(np.uint8)).save(mask)
        return r"masks/scene1/img3.png: mask is 40x20 but its image .*images/scene1/img3.png is 40x24"
    if problem == "label out of range":
        labels = blocky_labels(24, 40, 6, seed=3)
        labels[0, 0] = 9
        Image.fromarray(labels.astype(np.uint8)).save(mask)
        return r"masks/scene1/img3.png: label ids 9 \(1 px\) are outside \[0, data.n_labels=6\)"
    raise AssertionError(problem)


PER_SAMPLE = ["corrupt image", "truncated image", "missing mask", "size mismatch", "label out of range"]


def first_batch(
    ds: FolderSegmentation, batch_size: int = 5, num_workers: int = 0
) -> tuple[dict, SegmentationDataModule]:
    dm = SegmentationDataModule(
        ds, ds, size=16, n_labels=6, batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    iterator = iter(dm.val_dataloader())
    try:
        batch = next(iterator)
    except SampleError as err:
        err.with_traceback(None)  # its frames hold the iterator: drop them so the workers stop now
        del iterator
        raise
    del iterator
    return dm.on_before_batch_transfer(batch, 0), dm


@pytest.mark.parametrize("problem", PER_SAMPLE)
def test_bad_sample_raises_naming_file_and_problem(tmp_path, problem):
    pattern = break_dataset(tmp_path, problem)
    with pytest.raises(SampleError, match=pattern):  # at construction, or at the first batch that reads it
        first_batch(folder(tmp_path, size=16))


@pytest.mark.parametrize("problem", PER_SAMPLE)
def test_on_error_skip_drops_only_the_bad_sample(tmp_path, problem):
    clean = tmp_path / "clean"
    make_dataset(clean)
    want = collate_samples([folder(clean, size=16)[i] for i in (0, 1, 2, 4)])
    broken = tmp_path / "broken"
    break_dataset(broken, problem)
    ds = folder(broken, size=16, on_error="skip")
    batch, dm = first_batch(ds)
    assert batch["relative_file_path_"] == want["relative_file_path_"]
    assert torch.equal(batch["image"], want["image"]) and torch.equal(batch["label_map"], want["label_map"])
    skipped = ds.skipped + dm.skipped_samples
    assert len(skipped) == 1 and "scene1/img3.png" in skipped[0]


def test_a_batch_of_only_skipped_samples_becomes_none(tmp_path):
    break_dataset(tmp_path, "corrupt image")
    ds = folder(tmp_path, size=16, on_error="skip")
    assert isinstance(ds[3], SkippedSample)
    dm = SegmentationDataModule(ds, ds, size=16, n_labels=6, batch_size=1, shuffle=False)
    batches = [dm.on_before_batch_transfer(b, 0) for b in dm.val_dataloader()]
    assert [b is None for b in batches] == [False, False, False, True, False]
    assert len(dm.skipped_samples) == 1


def test_worker_processes_report_the_file(tmp_path):
    break_dataset(tmp_path, "label out of range")
    with pytest.raises(SampleError, match=r"scene1/img3.png: label ids 9"):
        first_batch(folder(tmp_path, size=16), num_workers=2)
    batch, dm = first_batch(folder(tmp_path, size=16, on_error="skip"), num_workers=2)
    assert batch["image"].shape[0] == 4 and "scene1/img3.png" in dm.skipped_samples[0]


def test_empty_file_list_and_missing_roots_are_named(tmp_path):
    make_dataset(tmp_path, n=1)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    for on_error in ("raise", "skip"):
        with pytest.raises(ValueError, match=f"file list {empty} is empty"):
            folder(tmp_path, file_list=str(empty), on_error=on_error)
        with pytest.raises(FileNotFoundError, match=f"image folder {tmp_path}/nope does not exist"):
            FolderSegmentation(str(tmp_path / "nope"), str(tmp_path / "masks"), n_labels=6, on_error=on_error)
    with pytest.raises(FileNotFoundError, match="file list .*/absent.txt does not exist"):
        folder(tmp_path, file_list=str(tmp_path / "absent.txt"))
    (tmp_path / "images/scene0/img0.png").unlink()
    with pytest.raises(ValueError, match=f"no images .* under {tmp_path}/images"):
        folder(tmp_path)


def test_bad_options_are_named(tmp_path):
    make_dataset(tmp_path, n=1)
    with pytest.raises(ValueError, match="data.on_error='ignore'"):
        folder(tmp_path, on_error="ignore")
    with pytest.raises(ValueError, match="interpolation='cubic'"):
        folder(tmp_path, interpolation="cubic")


# ---------------------------------------------------------------------------- config
def test_folder_config_trains_from_label_maps(tmp_path):
    for split in ("train", "val"):
        for i in range(2):
            labels = blocky_labels(20, 28, 19, seed=i)
            for name, arr in (("images", PALETTE[labels]), ("masks", labels.astype(np.uint8))):
                path = tmp_path / name / split / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(path)
    overrides = [
        "data=folder",
        f"data.root={tmp_path}",
        "data.size=16",
        "data.n_labels=19",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.persistent_workers=false",
        "data.pin_memory=false",
        "data.label_remap={0:255}",
        "paths.output_dir=/tmp/unused",
    ]
    cfg = compose_train(overrides)
    assert cfg.model.condition.ignore_label == 255 and cfg.model.cond_stage.in_channels == 19
    dm = instantiate(cfg.data)
    assert dm.train_dataset.flip and not dm.val_dataset.flip and dm.train_dataset.random_crop
    (tmp_path / "val.txt").write_text("1.png\n")  # a split list, relative to data.root
    listed = instantiate(compose_train([*overrides, "data.val_list=val.txt"]).data)
    assert [p.relative for p in listed.val_dataset.pairs] == ["1.png"]
    batch = next(iter(dm.val_dataloader()))
    assert "segmentation" not in batch and batch["label_map"].shape == (2, 16, 16)
    want = resize_smallest_side(
        blocky_labels(20, 28, 19, seed=0).astype(np.uint8), 16, INTERPOLATIONS["nearest"]
    )
    want = np.where(want == 0, 255, want)[:, 3:19]  # 20x28 -> 16x22, centre crop at x=3
    assert np.array_equal(batch["label_map"][0].numpy(), want)
