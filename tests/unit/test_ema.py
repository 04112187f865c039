"""LitEma: CompVis buffer names/dtypes and the exact update arithmetic."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from segldm.models.ema import LitEma, shadow_name
from segldm.models.unet import UNetModel
from tests.compvis_fixtures import SKIP_REASON, fixtures_dir, read_keys_file  # noqa: E402


class Wrapper(nn.Module):
    """Stands in for CompVis' DiffusionWrapper (``model.diffusion_model``)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.diffusion_model = unet


class Holder(nn.Module):
    """Stands in for LatentDiffusion: ``model`` plus ``model_ema``."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.model = Wrapper(unet)
        self.model_ema = LitEma(self.model)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2)))
    model[0].bias.requires_grad_(False)
    return model


def test_buffers_names_and_dtypes() -> None:
    model = small_model()
    ema = LitEma(model)
    buffers = dict(ema.named_buffers())
    assert set(buffers) == {"decay", "num_updates", "0weight", "20weight", "20bias"}  # frozen bias skipped
    assert buffers["decay"].dtype == torch.float32 and buffers["decay"].shape == ()
    assert buffers["num_updates"].dtype == torch.int32 and buffers["num_updates"].item() == 0
    assert torch.equal(buffers["20weight"], model[2][0].weight)
    assert LitEma(model, use_num_upates=False).num_updates.item() == -1
    assert LitEma(model, use_num_updates=False).num_updates.item() == -1
    assert shadow_name("model.diffusion_model.input_blocks.1.0.in_layers.2.weight") == (
        "modeldiffusion_modelinput_blocks10in_layers2weight"
    )
    with pytest.raises(ValueError, match="decay"):
        LitEma(model, decay=1.5)


def test_ldm_key_names_match_full_seed_checkpoint() -> None:
    keys_file = fixtures_dir() / "seed_full_keys.txt"
    if not keys_file.is_file():
        pytest.skip(SKIP_REASON)
    expected = {k: s for k, s in read_keys_file(keys_file).items() if k.startswith("model_ema.")}
    with torch.device("meta"):
        holder = Holder(
            UNetModel(
                image_size=64,
                in_channels=6,
                out_channels=3,
                model_channels=128,
                attention_resolutions=[32, 16, 8],
                num_res_blocks=2,
                channel_mult=[1, 4, 8],
                num_heads=8,
            )
        )
    got = {k: tuple(v.shape) for k, v in holder.state_dict().items() if k.startswith("model_ema.")}
    assert got == expected
    assert "model_ema.diffusion_modelinput_blocks10in_layers2weight" in got


def test_update_matches_closed_form() -> None:
    """Each step lands within 2 ulps (float32) of the exact shadow - (1 - d)(shadow - param), computed in
    float64 from the same float32 inputs; the reference's three float32 ops land as close, so the
    in-place lerp and CompVis's form agree to rounding, every step, on any CPU."""
    model = small_model()
    ema = LitEma(model, decay=0.9)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    buffers = dict(ema.named_buffers())
    gen = torch.Generator().manual_seed(1)

    def step_and_check(n: int) -> None:
        with torch.no_grad():
            for _, p in model.named_parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 3.0)
        before = {name: buffers[shadow_name(name)].clone() for name, _ in trainable}
        ema(model)
        assert ema.num_updates.item() == n
        # d = min(decay, (1+n)/(10+n)) in float32, as the reference
        count = torch.tensor(n, dtype=torch.int32)
        w = (1.0 - torch.minimum(torch.tensor(0.9), (1 + count) / (10 + count))).double()
        for name, p in trainable:
            s, q = before[name].double(), p.detach().double()
            exact = s - w * (s - q)
            reference = (before[name] - float(w) * (before[name] - p.detach())).double()
            bound = 2.0**-22 * torch.maximum(torch.maximum(s.abs(), q.abs()), exact.abs())
            got = buffers[shadow_name(name)].double()
            assert ((got - exact).abs() <= bound).all(), (n, name)
            assert ((reference - exact).abs() <= bound).all(), (n, name)

    # n = 1..7: (1+n)/(10+n) caps the decay (0.18 at n = 1, so lerp's both branches run)
    for n in range(1, 8):
        step_and_check(n)
    assert ema.num_updates.item() == 7 and ema.num_updates.dtype == torch.int32
    # from n = 80 on the configured decay is the smaller: n = 100 moves each shadow by 1 - 0.9 exactly
    ema.num_updates.fill_(99)
    step_and_check(100)
    assert ema.num_updates.dtype == torch.int32


def test_constant_decay_without_num_updates() -> None:
    model = small_model()
    ema = LitEma(model, decay=0.5, use_num_upates=False)
    start = model[2][0].weight.detach().clone()
    with torch.no_grad():
        model[2][0].weight.add_(2.0)
    ema(model)
    assert ema.num_updates.item() == -1
    torch.testing.assert_close(ema.get_buffer("20weight"), start + 1.0)


def test_copy_to_store_restore_and_state_dict_round_trip() -> None:
    model = small_model()
    ema = LitEma(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema(model)
    raw = [p.detach().clone() for p in model.parameters()]
    ema.store(model.parameters())
    ema.copy_to(model)
    assert torch.equal(model[0].weight, ema.get_buffer("0weight"))
    assert torch.equal(model[0].bias, raw[1])  # frozen parameters are untouched
    ema.restore(model.parameters())
    assert all(torch.equal(p, r) for p, r in zip(model.parameters(), raw, strict=True))
    other = LitEma(small_model())
    other.load_state_dict(ema.state_dict())
    assert other.num_updates.item() == 1
    assert torch.equal(other.get_buffer("20bias"), ema.get_buffer("20bias"))
