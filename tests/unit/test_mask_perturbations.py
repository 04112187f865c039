"""Mask perturbations (segldm.pipeline.mask_perturbations) against their closed forms."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from segldm.pipeline.mask_perturbations import (
    BoundaryDrop,
    Dilate,
    Downsample,
    Erode,
    LabelSpace,
    PixelDrop,
    SwapRegions,
    boundary_band,
    dilate,
    downsample_nearest,
    erode,
    regions,
    swap_regions,
)

SPACE = LabelSpace(n_labels=8, ignore_label=None)


def square(size: int = 32, top: int = 10, side: int = 12, inside: int = 1, outside: int = 0) -> np.ndarray:
    labels = np.full((size, size), outside, dtype=np.int64)
    labels[top : top + side, top : top + side] = inside
    return labels


@pytest.mark.parametrize("k", [1, 2, 3])
def test_erosion_by_k_shrinks_a_square_by_k_per_side_and_its_background_takes_the_freed_pixels(
    k: int,
) -> None:
    out = erode(square(), k, classes=[1])
    assert np.array_equal(out, square(top=10 + k, side=12 - 2 * k))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_dilation_by_k_grows_a_square_by_k_per_side(k: int) -> None:
    out = dilate(square(), k, classes=[1])
    assert np.array_equal(out, square(top=10 - k, side=12 + 2 * k))


def test_erosion_and_dilation_leave_other_classes_and_ignore_pixels_alone() -> None:
    labels = square()
    labels[0:4, :] = 255  # a don't-care stripe, away from the square
    labels[10:22, 22:26] = 255  # and one along the square's right side
    space = LabelSpace(8, 255)
    for perturbation in (Erode(k=2, classes=[1]), Dilate(k=2, classes=[1])):
        out = perturbation(labels, 0, space)
        assert np.array_equal(out == 255, labels == 255), perturbation.name
    # the background (class 0) is not eroded: its pixels only change by the square growing
    dilated = Dilate(k=2, classes=[1])(labels, 0, space)
    assert set(np.unique(dilated[labels == 0])) <= {0, 1}
    # eroded pixels of the square never take the ignore label: they go to the nearest class-0 pixel
    eroded = Erode(k=2, classes=[1])(labels, 0, space)
    assert set(np.unique(eroded[labels == 1])) == {0, 1}


def test_erosion_at_the_image_border_frees_nothing_there() -> None:
    labels = np.zeros((16, 16), dtype=np.int64)
    labels[:, :8] = 1  # class 1 fills the left half, touching three image borders
    out = erode(labels, 2, classes=[1])
    expected = np.zeros_like(labels)
    expected[:, :6] = 1  # only the side facing class 0 shrinks
    assert np.array_equal(out, expected)


def test_boundary_band_of_a_straight_boundary_is_two_radius_plus_one_columns_wide() -> None:
    labels = np.zeros((8, 20), dtype=np.int64)
    labels[:, 10:] = 3
    for radius in (0, 1, 2):
        band = boundary_band(labels, radius)
        columns = np.flatnonzero(band.any(0))
        assert band.all(0)[columns].all()
        # SCDM: edge pixels on both sides of the boundary, then the L1 radius
        assert list(columns) == list(range(9 - radius, 11 + radius))


def test_boundary_band_is_the_l1_ball_around_scdm_edges() -> None:
    labels = square(size=20, top=6, side=5)
    edges = np.zeros_like(labels, dtype=bool)  # SCDM get_edges: differs from a 4-neighbour
    for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        shifted = np.roll(labels, (dy, dx), axis=(0, 1))
        valid = np.ones_like(edges)
        if dy:
            valid[0 if dy == 1 else -1, :] = False
        if dx:
            valid[:, 0 if dx == 1 else -1] = False
        edges |= (shifted != labels) & valid
    ys, xs = np.nonzero(edges)
    yy, xx = np.mgrid[0:20, 0:20]
    distance = np.min(np.abs(yy[..., None] - ys) + np.abs(xx[..., None] - xs), axis=-1)
    assert np.array_equal(boundary_band(labels, 2), distance <= 2)


def test_boundary_drop_fills_the_band_with_the_ignore_label_or_random_other_classes() -> None:
    labels = square()
    band = boundary_band(labels, 2)
    out = BoundaryDrop(radius=2, fill="ignore")(labels, 0, LabelSpace(8, 255))
    assert np.array_equal(out == 255, band) and np.array_equal(out[~band], labels[~band])
    random = BoundaryDrop(radius=2, fill="random")(labels, 0, SPACE)
    assert (random[band] != labels[band]).all() and np.array_equal(random[~band], labels[~band])
    assert random.min() >= 0 and random.max() < 8
    with pytest.raises(ValueError, match="no ignore label.*fill=random"):
        BoundaryDrop(fill="ignore").check(SPACE)


def test_pixel_drop_changes_about_p_of_the_pixels_and_is_deterministic_per_seed_and_index() -> None:
    labels = np.random.default_rng(0).integers(0, 8, size=(64, 64))
    drop = PixelDrop(p=0.1, fill="random", seed=3)
    out = drop(labels, 5, SPACE)
    changed = (out != labels).mean()
    assert 0.08 < changed < 0.12
    assert np.array_equal(out, drop(labels, 5, SPACE))
    assert not np.array_equal(out, drop(labels, 6, SPACE))
    assert not np.array_equal(out, PixelDrop(p=0.1, fill="random", seed=4)(labels, 5, SPACE))
    assert np.array_equal(PixelDrop(p=0.0, fill="random")(labels, 0, SPACE), labels)


@pytest.mark.parametrize("factor", [2, 4])
def test_downsample_then_nearest_upsample_is_block_constant(factor: int) -> None:
    labels = np.random.default_rng(1).integers(0, 8, size=(16, 24))
    out = downsample_nearest(labels, factor)
    offset = factor // 2
    picked = labels[offset::factor, offset::factor]
    assert np.array_equal(out, np.kron(picked, np.ones((factor, factor), dtype=np.int64)))


def test_downsample_matches_pil_nearest_down_and_up_as_scdm_resized() -> None:
    labels = np.random.default_rng(2).integers(0, 8, size=(30, 22))  # sizes not divisible by the factor
    small = Image.fromarray(labels.astype(np.int32), mode="I").resize((22 // 4, 30 // 4), Image.NEAREST)
    back = np.asarray(small.resize((22, 30), Image.NEAREST)).astype(np.int64)
    assert np.array_equal(downsample_nearest(labels, 4), back)


def test_swap_of_a_share_of_regions_changes_exactly_that_many_regions() -> None:
    labels = np.zeros((40, 40), dtype=np.int64)
    for i in range(4):  # 16 squares of classes 1..4 on class 0: 17 regions
        for j in range(4):
            labels[2 + 10 * i : 8 + 10 * i, 2 + 10 * j : 8 + 10 * j] = 1 + (i + j) % 4
    ids, count = regions(labels)
    assert count == 17
    for fraction in (0.0, 0.1, 0.25, 0.5, 1.0):
        out, changed = swap_regions(labels, fraction, np.random.default_rng(0), SPACE)
        expected = int(np.floor(fraction * count + 0.5))
        assert len(changed) == expected
        really = [r for r in range(1, count + 1) if (out[ids == r] != labels[ids == r]).all()]
        untouched = [r for r in range(1, count + 1) if (out[ids == r] == labels[ids == r]).all()]
        assert really == list(changed) and len(untouched) == count - expected
        for r in really:  # one new class per region, in range
            assert len(np.unique(out[ids == r])) == 1 and 0 <= out[ids == r][0] < 8


def test_every_perturbation_keeps_ignore_pixels_and_records_its_card() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 8, size=(32, 32))
    labels[rng.random(labels.shape) < 0.2] = 255
    space = LabelSpace(8, 255)
    perturbations = [
        Downsample(factor=4),
        BoundaryDrop(radius=1, fill="random"),
        PixelDrop(p=0.5, fill=2),
        Erode(k=1, classes=[1, 2]),
        Dilate(k=1, classes=[3]),
        SwapRegions(fraction=0.5, seed=7),
    ]
    for perturbation in perturbations:
        perturbation.check(space)
        out = perturbation(labels, 11, space)
        assert out.shape == labels.shape and out.dtype == np.int64
        assert (out[labels == 255] == 255).all(), perturbation.name
        assert ((out >= 0) & (out < 8) | (out == 255)).all()
        card = perturbation.card()
        assert card["name"] == perturbation.name and "params" in card and card["seed"] == perturbation.seed
    assert SwapRegions(fraction=0.5, seed=7).card()["params"] == {"fraction": 0.5}


def test_bad_settings_name_the_key_and_the_way_out() -> None:
    with pytest.raises(ValueError, match="classes=\\[\\] must list class ids"):
        Erode(k=2).check(SPACE)
    with pytest.raises(ValueError, match="fill=9 is neither a class id"):
        PixelDrop(fill=9).check(SPACE)
    with pytest.raises(ValueError, match="p=1.5"):
        PixelDrop(p=1.5)
    with pytest.raises(ValueError, match="fill='blue'"):
        BoundaryDrop(fill="blue")
