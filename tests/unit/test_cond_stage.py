"""SpatialRescaler: reference output on the fixtures and the interpolation facts the notes rely on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from segldm.models.cond_stage import SpatialRescaler
from tests.compvis_fixtures import (
    SKIP_REASON,
    assert_close_rel,
    load_config,
    load_io,
    load_state_dict,
    model_fixture_dirs,
    sub_state_dict,
)

FIXTURES = model_fixture_dirs()
with_fixtures = pytest.mark.parametrize(
    "folder",
    FIXTURES or [pytest.param(None, marks=pytest.mark.skip(reason=SKIP_REASON))],
    ids=lambda p: p.name if isinstance(p, Path) else "none",
)


@with_fixtures
def test_fixture_cond_matches_reference(folder: Path) -> None:
    io = load_io(folder)
    rescaler = SpatialRescaler(**load_config(folder)["model"]["params"]["cond_stage_config"]["params"])
    rescaler.load_state_dict(sub_state_dict(load_state_dict(folder), "cond_stage_model."), strict=True)
    seg = io["batch_segmentation"].float().permute(0, 3, 1, 2)
    with torch.no_grad():
        assert_close_rel(rescaler.encode(seg), io["cond"], name="cond")
    assert rescaler.downsample_factor * io["cond"].shape[-1] == seg.shape[-1]


def test_seed_rescaler_keys_and_shapes() -> None:
    rescaler = SpatialRescaler(n_stages=2, in_channels=182, out_channels=3)
    assert {k: tuple(v.shape) for k, v in rescaler.state_dict().items()} == {
        "channel_mapper.weight": (3, 182, 1, 1)
    }
    assert sum(p.numel() for p in rescaler.parameters()) == 546
    assert rescaler.downsample_factor == 4
    assert rescaler(torch.zeros(1, 182, 256, 256)).shape == (1, 3, 64, 64)
    with_bias = SpatialRescaler(in_channels=182, out_channels=3, bias=True)
    assert set(with_bias.state_dict()) == {"channel_mapper.weight", "channel_mapper.bias"}


def test_bilinear_half_is_average_pool_and_sizes_floor() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, 12)
    rescaler = SpatialRescaler(n_stages=2, in_channels=5)
    assert list(rescaler.parameters()) == []
    torch.testing.assert_close(rescaler(x), F.avg_pool2d(F.avg_pool2d(x, 2), 2))
    assert torch.equal(rescaler.encode(x), rescaler(x))
    assert SpatialRescaler(n_stages=1, in_channels=5)(torch.randn(1, 5, 9, 7)).shape == (1, 5, 4, 3)
    assert SpatialRescaler(n_stages=0).downsample_factor == 1
    assert SpatialRescaler(n_stages=1, multiplier=0.25).downsample_factor == 4


def test_other_methods_and_validation() -> None:
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(SpatialRescaler(method="nearest", in_channels=1)(x), x[:, :, ::2, ::2])
    assert SpatialRescaler(method="area", in_channels=1)(x).shape == (1, 1, 2, 2)
    with pytest.raises(ValueError, match="method"):
        SpatialRescaler(method="lanczos")
    with pytest.raises(ValueError, match="n_stages"):
        SpatialRescaler(n_stages=-1)
