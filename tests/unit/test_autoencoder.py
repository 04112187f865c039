"""VQ first stage: CompVis key layout, reference numerics (fixtures), quantizer semantics, loading errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from segldm.models.autoencoder import (
    AttnBlock,
    CheckpointError,
    Decoder,
    Downsample,
    Encoder,
    VectorQuantizer,
    VQModel,
    load_first_stage_weights,
)
from tests.compvis_fixtures import (
    SKIP_REASON,
    assert_close_rel,
    fixtures_dir,
    load_config,
    load_io,
    load_state_dict,
    model_fixture_dirs,
    read_keys_file,
    sub_state_dict,
)

FIXTURES = model_fixture_dirs()
with_fixtures = pytest.mark.parametrize(
    "folder",
    FIXTURES or [pytest.param(None, marks=pytest.mark.skip(reason=SKIP_REASON))],
    ids=lambda p: p.name if isinstance(p, Path) else "none",
)

VQ_F4_DDCONFIG = dict(
    double_z=False,
    z_channels=3,
    resolution=256,
    in_channels=3,
    out_ch=3,
    ch=128,
    ch_mult=[1, 2, 4],
    num_res_blocks=2,
    attn_resolutions=[],
    dropout=0.0,
)

TINY_DDCONFIG = dict(
    double_z=False,
    z_channels=4,
    resolution=16,
    in_channels=3,
    out_ch=3,
    ch=32,
    ch_mult=[1, 2],
    num_res_blocks=1,
    attn_resolutions=[16, 8],
    dropout=0.0,
)


def vq_kwargs(folder: Path) -> dict[str, object]:
    params = load_config(folder)["model"]["params"]["first_stage_config"]["params"]
    return {k: params[k] for k in ("ddconfig", "n_embed", "embed_dim")}


def fixture_vq(folder: Path) -> VQModel:
    vq = VQModel(**vq_kwargs(folder))  # type: ignore[arg-type]
    vq.load_state_dict(sub_state_dict(load_state_dict(folder), "first_stage_model."), strict=True)
    return vq.eval()


def tiny_vq(**overrides: object) -> VQModel:
    kwargs: dict[str, object] = dict(ddconfig=TINY_DDCONFIG, n_embed=16, embed_dim=4)
    kwargs.update(overrides)
    return VQModel(**kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- reference fixtures


@with_fixtures
@pytest.mark.parametrize("impl", ["sdpa", "einsum"])
def test_fixture_first_stage_matches_reference(folder: Path, impl: str) -> None:
    io = load_io(folder)
    vq = fixture_vq(folder)
    for module in vq.modules():
        if isinstance(module, AttnBlock):
            module.attention_impl = impl
    with torch.no_grad():
        h = vq.encode(io["x"])
        assert_close_rel(h, io["fs_h"], name="fs_h")
        zq, qloss, indices = vq.quantize_latent(h)
        assert torch.equal(indices, io["fs_indices"])
        assert_close_rel(zq, io["fs_quant"], name="fs_quant")
        assert_close_rel(qloss, io["fs_qloss"], name="fs_qloss")
        assert_close_rel(vq.decode(io["z"]), io["fs_dec"], name="fs_dec")
        assert_close_rel(vq.decode(io["z"], force_not_quantize=True), io["fs_dec_noquant"], name="noquant")
        assert_close_rel(vq.decode(io["ddim/samples"]), io["ddim/decoded"], name="ddim/decoded")
        assert_close_rel(
            vq.decode(io["ddim/samples"], force_not_quantize=True), io["ddim/decoded_noquant"], name="ddim/nq"
        )
        assert torch.equal(vq.quantize_latent(io["ddim/samples"])[2], io["ddim/indices"])
        assert_close_rel(vq.decode_code(io["fs_indices"]), io["fs_dec"], name="decode_code")
        rec, loss, idx = vq(io["x"])
        assert_close_rel(rec, io["fs_dec"], name="forward")
        assert torch.equal(idx, io["fs_indices"])


@with_fixtures
def test_fixture_ldm_checkpoint_loads_through_first_stage_loader(folder: Path) -> None:
    vq = VQModel(**vq_kwargs(folder), ckpt_path=folder / "model.ckpt")  # type: ignore[arg-type]
    expected = sub_state_dict(load_state_dict(folder), "first_stage_model.")
    got = vq.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)
    if (folder / "keys.txt").is_file():
        listed = {
            k.removeprefix("first_stage_model."): s
            for k, s in read_keys_file(folder / "keys.txt").items()
            if k.startswith("first_stage_model.")
        }
        assert {k: tuple(v.shape) for k, v in got.items()} == listed


def test_full_vq_f4_keys_and_shapes_match_reference() -> None:
    keys_file = fixtures_dir() / "seed_full_keys.txt"
    if not keys_file.is_file():
        pytest.skip(SKIP_REASON)
    expected = {
        k.removeprefix("first_stage_model."): shape
        for k, shape in read_keys_file(keys_file).items()
        if k.startswith("first_stage_model.")
    }
    with torch.device("meta"):
        vq = VQModel(ddconfig=VQ_F4_DDCONFIG, n_embed=8192, embed_dim=3)
    assert {k: tuple(v.shape) for k, v in vq.state_dict().items()} == expected
    assert sum(p.numel() for p in vq.parameters()) == 55_322_782
    assert sum(p.numel() for p in vq.encoder.parameters()) == 22_337_411
    assert sum(p.numel() for p in vq.decoder.parameters()) == 32_960_771
    assert vq.downsample_factor == 4 and vq.latent_channels == 3


# --------------------------------------------------------------------------- tiny configurations


def test_tiny_vq_with_attention_shapes_and_keys() -> None:
    vq = tiny_vq()
    sd = vq.state_dict()
    # resolution 16 -> level 0 at 16 px, level 1 at 8 px: attention everywhere.
    for key, shape in {
        "encoder.down.0.attn.0.q.weight": (32, 32, 1, 1),
        "encoder.down.0.downsample.conv.weight": (32, 32, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (64, 32, 1, 1),
        "encoder.down.1.attn.0.proj_out.weight": (64, 64, 1, 1),
        "encoder.mid.attn_1.k.weight": (64, 64, 1, 1),
        "encoder.conv_out.weight": (4, 64, 3, 3),
        "decoder.conv_in.weight": (64, 4, 3, 3),
        "decoder.up.1.attn.1.v.weight": (64, 64, 1, 1),
        "decoder.up.1.upsample.conv.weight": (64, 64, 3, 3),
        "decoder.up.0.block.0.nin_shortcut.weight": (32, 64, 1, 1),
        "decoder.up.0.attn.1.norm.weight": (32,),
        "quantize.embedding.weight": (16, 4),
        "quant_conv.weight": (4, 4, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
    }.items():
        assert tuple(sd[key].shape) == shape, key
    assert "encoder.down.1.downsample.conv.weight" not in sd and "decoder.up.0.upsample.conv.weight" not in sd
    assert not any(k.startswith("loss.") for k in sd)
    x = torch.randn(2, 3, 24, 16)  # attention placement follows `resolution`, not the input size
    h = vq.encode(x)
    assert h.shape == (2, 4, 12, 8)
    zq, qloss, idx = vq.quantize_latent(h)
    assert zq.shape == h.shape and qloss.shape == () and idx.shape == (2, 12, 8) and idx.dtype == torch.long
    assert vq.decode(h).shape == (2, 3, 24, 16)
    assert vq.decode_code(idx).shape == (2, 3, 24, 16)
    rec, _, _ = vq(x)
    assert rec.shape == x.shape
    assert vq.downsample_factor == 2 and vq.latent_channels == 4


def test_double_z_and_decoder_flags() -> None:
    cfg = dict(TINY_DDCONFIG, double_z=True, give_pre_end=True)
    enc, dec = Encoder(**cfg), Decoder(**cfg)
    assert enc(torch.randn(1, 3, 16, 16)).shape == (1, 8, 8, 8)
    assert dec(torch.randn(1, 4, 8, 8)).shape == (1, 32, 16, 16)  # give_pre_end: before norm_out/conv_out
    dec = Decoder(**dict(TINY_DDCONFIG, tanh_out=True))
    assert dec(torch.randn(1, 4, 8, 8) * 100).abs().max() <= 1
    with pytest.raises(TypeError):
        Encoder(**dict(TINY_DDCONFIG, unknown_option=1))
    with pytest.raises(ValueError, match="ch=24"):
        Encoder(**dict(TINY_DDCONFIG, ch=24))


def test_downsample_pads_right_and_bottom_only() -> None:
    down = Downsample(32, with_conv=True)
    x = torch.randn(1, 32, 8, 8)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    torch.testing.assert_close(down(x), expected, rtol=0, atol=0)
    assert down(x).shape == (1, 32, 4, 4)


def test_attnblock_sdpa_matches_reference_einsum() -> None:
    torch.manual_seed(0)
    block = AttnBlock(32, attention_impl="einsum")
    x = torch.randn(2, 32, 6, 5) * 3
    ref = block(x)
    block.attention_impl = "sdpa"
    assert_close_rel(block(x), ref, rel=1e-5, name="AttnBlock")


def test_vector_quantizer_semantics() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(n_e=32, e_dim=3, beta=0.25)
    w = vq.embedding.weight
    assert w.min() >= -1 / 32 and w.max() <= 1 / 32
    with torch.no_grad():
        w.copy_(torch.randn(32, 3))
    z = torch.randn(2, 3, 5, 4, requires_grad=True)
    zq, loss, (perp, enc, idx) = vq(z)
    assert perp is None and enc is None and idx.shape == (2 * 5 * 4,)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    assert torch.equal(idx, torch.cdist(flat, w.detach()).argmin(dim=1))
    codes = w.detach()[idx].reshape(2, 5, 4, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(zq, codes)
    mse = ((codes - z.detach()) ** 2).mean()
    torch.testing.assert_close(loss, 1.25 * mse)
    # Straight-through: gradient w.r.t. z of sum(zq) is exactly ones; loss gives the codebook its grad.
    (zq.sum() + loss).backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    torch.testing.assert_close(z.grad, torch.ones_like(z) + 2 * (z.detach() - codes) / z.numel())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # distances stay float32 under autocast
        assert torch.equal(vq(z.detach())[2][2], idx)
    sane = VectorQuantizer(32, 3, sane_index_shape=True)
    assert sane(torch.randn(2, 3, 5, 4))[2][2].shape == (2, 5, 4)
    with pytest.raises(ValueError, match="remap"):
        VectorQuantizer(32, 3, remap="some/file.npy")


# --------------------------------------------------------------------------- checkpoint loading


def test_loads_compvis_lightning_and_ldm_layouts(tmp_path: Path) -> None:
    src = tiny_vq()
    sd = src.state_dict()
    compvis = tmp_path / "vq.ckpt"
    torch.save(
        {"state_dict": {**sd, "loss.discriminator.main.0.weight": torch.zeros(2)}, "epoch": 3}, compvis
    )
    lightning = tmp_path / "lit.ckpt"
    torch.save(
        {"state_dict": {**{f"vq.{k}": v for k, v in sd.items()}, "loss.perceptual.w": torch.ones(1)}},
        lightning,
    )
    ldm = tmp_path / "ldm.ckpt"
    torch.save(
        {"state_dict": {**{f"first_stage_model.{k}": v for k, v in sd.items()}, "betas": torch.ones(3)}}, ldm
    )
    bare = tmp_path / "bare.pt"
    torch.save(sd, bare)
    for path in (compvis, lightning, ldm, bare):
        dst = tiny_vq()
        load_first_stage_weights(dst, path, ignore_keys=("loss.",))
        assert all(torch.equal(dst.state_dict()[k], v) for k, v in sd.items()), path
    loaded = tiny_vq(ckpt_path=str(compvis), ignore_keys=())  # loss.* is always dropped
    assert torch.equal(loaded.quantize.embedding.weight, sd["quantize.embedding.weight"])
    assert loaded.loaded_from == str(compvis) and tiny_vq().loaded_from is None
    partial = tmp_path / "partial.ckpt"
    torch.save({"state_dict": {**sd, "extra.w": torch.ones(1)}}, partial)
    load_first_stage_weights(tiny_vq(), partial, ignore_keys=("extra.",))


def test_missing_checkpoint_explains_how_to_get_one(tmp_path: Path) -> None:
    missing = tmp_path / "models" / "first_stage_models" / "vq-f4" / "model.ckpt"
    with pytest.raises(FileNotFoundError) as info:
        tiny_vq(ckpt_path=missing)
    message = str(info.value)
    assert str(missing) in message
    assert (
        "vq-f4.zip" in message and "python -m segldm.train" in message and "quickstart_autoencoder" in message
    )


def test_wrong_keys_and_shapes_are_named(tmp_path: Path) -> None:
    sd = tiny_vq().state_dict()
    broken = dict(sd)
    del broken["decoder.conv_out.bias"]
    broken["encoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.ckpt"
    torch.save({"state_dict": broken}, path)
    with pytest.raises(CheckpointError) as info:
        load_first_stage_weights(tiny_vq(), path)
    message = str(info.value)
    assert str(path) in message and "decoder.conv_out.bias" in message and "encoder.extra.weight" in message
    # A checkpoint of another config: shape mismatch names the key and both shapes.
    other = VQModel(ddconfig=TINY_DDCONFIG, n_embed=8, embed_dim=4).state_dict()
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": other}, path)
    with pytest.raises(
        ValueError, match=r"quantize\.embedding\.weight: checkpoint \(8, 4\) vs model \(16, 4\)"
    ):
        load_first_stage_weights(tiny_vq(), path)


def test_unreadable_files_raise_value_error_naming_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": tiny_vq().state_dict()}, good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:2000])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_text("this is not a checkpoint\n")
    not_sd = tmp_path / "list.ckpt"
    torch.save([1, 2, 3], not_sd)
    for path in (truncated, garbage, not_sd, tmp_path):
        with pytest.raises(ValueError, match=re.escape(str(path))):
            load_first_stage_weights(tiny_vq(), path)
