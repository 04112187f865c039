"""UNetModel: CompVis key layout, reference numerics (fixtures), options and attention paths."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from segldm.models.cond_stage import SpatialRescaler
from segldm.models.unet import (
    AttentionBlock,
    ResBlock,
    UNetModel,
    attention_levels,
    legacy_qkv_attention,
    timestep_embedding,
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

SEED_UNET = dict(
    image_size=64,
    in_channels=6,
    out_channels=3,
    model_channels=128,
    attention_resolutions=[32, 16, 8],
    num_res_blocks=2,
    channel_mult=[1, 4, 8],
    num_heads=8,
)


def tiny_unet(**overrides: object) -> UNetModel:
    kwargs: dict[str, object] = dict(
        image_size=8,
        in_channels=4,
        model_channels=32,
        out_channels=3,
        num_res_blocks=1,
        attention_resolutions=(1, 2),
        channel_mult=(1, 2),
        num_heads=2,
    )
    kwargs.update(overrides)
    return UNetModel(**kwargs)  # type: ignore[arg-type]


def randomize(model: nn.Module, seed: int = 0, std: float = 0.1) -> nn.Module:
    """Non-zero weights everywhere so zero-initialised branches contribute."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def build_from_fixture(folder: Path) -> tuple[UNetModel, SpatialRescaler]:
    params = load_config(folder)["model"]["params"]
    sd = load_state_dict(folder)
    unet = UNetModel(**params["unet_config"]["params"])
    unet.load_state_dict(sub_state_dict(sd, "model.diffusion_model."), strict=True)
    rescaler = SpatialRescaler(**params["cond_stage_config"]["params"])
    rescaler.load_state_dict(sub_state_dict(sd, "cond_stage_model."), strict=True)
    return unet, rescaler


# --------------------------------------------------------------------------- reference fixtures


@with_fixtures
@pytest.mark.parametrize("impl", ["sdpa", "einsum"])
def test_fixture_eps_matches_reference(folder: Path, impl: str) -> None:
    io = load_io(folder)
    unet, _ = build_from_fixture(folder)
    unet.set_attention_impl(impl)
    unet.eval()
    with torch.no_grad():
        eps = unet(io["unet_input"], io["t"])
    assert_close_rel(eps, io["eps"], name=f"eps[{impl}]")


@with_fixtures
def test_fixture_loss_and_gradients_match_reference(folder: Path) -> None:
    io = load_io(folder)
    unet, rescaler = build_from_fixture(folder)
    seg = io["batch_segmentation"].float().permute(0, 3, 1, 2)
    cond = rescaler(seg)
    assert_close_rel(cond, io["cond"], name="cond")
    eps = unet(torch.cat([io["x_noisy"], cond], dim=1), io["t"])
    loss = (io["noise"] - eps).abs().mean()
    assert_close_rel(loss, io["loss"], name="loss")
    loss.backward()
    params = {f"model.diffusion_model.{k}": p for k, p in unet.named_parameters()}
    params.update({f"cond_stage_model.{k}": p for k, p in rescaler.named_parameters()})
    grad_keys = [k for k in io if k.startswith("grad/")]
    assert "grad/cond_stage_model.channel_mapper.weight" in grad_keys
    for key in grad_keys:
        param = params[key.removeprefix("grad/")]
        assert param.grad is not None, key
        assert_close_rel(param.grad, io[key], name=key)


@with_fixtures
def test_fixture_unet_key_set_matches_checkpoint(folder: Path) -> None:
    unet, _ = build_from_fixture(folder)
    expected = (
        {
            k.removeprefix("model.diffusion_model."): v
            for k, v in read_keys_file(folder / "keys.txt").items()
            if k.startswith("model.diffusion_model.")
        }
        if (folder / "keys.txt").is_file()
        else {
            k: tuple(v.shape)
            for k, v in sub_state_dict(load_state_dict(folder), "model.diffusion_model.").items()
        }
    )
    assert {k: tuple(v.shape) for k, v in unet.state_dict().items()} == expected


def test_full_seed_unet_keys_and_shapes_match_reference() -> None:
    keys_file = fixtures_dir() / "seed_full_keys.txt"
    if not keys_file.is_file():
        pytest.skip(SKIP_REASON)
    expected = {
        k.removeprefix("model.diffusion_model."): shape
        for k, shape in read_keys_file(keys_file).items()
        if k.startswith("model.diffusion_model.")
    }
    with torch.device("meta"):
        unet = UNetModel(**SEED_UNET)  # type: ignore[arg-type]
    got = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert sorted(got) == sorted(expected)
    assert got == expected
    assert sum(p.numel() for p in unet.parameters()) == 215_229_315
    # The seed's attention_resolutions are ds factors that never occur: middle attention only.
    assert [name for name, m in unet.named_modules() if isinstance(m, AttentionBlock)] == ["middle_block.1"]
    assert unet.middle_block[1].num_heads == 8


# --------------------------------------------------------------------------- building blocks


def test_timestep_embedding_is_cos_then_sin() -> None:
    t = torch.tensor([0, 3, 999])
    emb = timestep_embedding(t, 8)
    freqs = torch.exp(-math.log(10000) * torch.arange(4, dtype=torch.float32) / 4)
    args = t[:, None].float() * freqs
    torch.testing.assert_close(emb, torch.cat([torch.cos(args), torch.sin(args)], dim=1))
    assert torch.equal(emb[0], torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]))
    odd = timestep_embedding(t, 9)
    assert odd.shape == (3, 9) and torch.equal(odd[:, -1], torch.zeros(3))
    assert emb.dtype == torch.float32


def test_attention_levels_reads_ds_factors() -> None:
    assert attention_levels([32, 16, 8], [1, 4, 8]) == []
    assert attention_levels([4, 2], [1, 2, 4]) == [1, 2]


def test_legacy_head_layout_is_qkv_per_head() -> None:
    torch.manual_seed(0)
    heads, ch, length = 2, 4, 5
    qkv = torch.randn(1, 3 * heads * ch, length)
    out = legacy_qkv_attention(qkv, heads, "einsum")
    for h in range(heads):
        block = qkv[0, h * 3 * ch : (h + 1) * 3 * ch]
        q, k, v = block[:ch], block[ch : 2 * ch], block[2 * ch :]
        w = torch.softmax(q.T @ k / math.sqrt(ch), dim=-1)  # (query, key)
        torch.testing.assert_close(out[0, h * ch : (h + 1) * ch], v @ w.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("heads,ch,length", [(1, 32, 16), (4, 8, 64), (8, 16, 7)])
def test_sdpa_and_einsum_attention_agree(heads: int, ch: int, length: int) -> None:
    torch.manual_seed(heads)
    qkv = torch.randn(2, 3 * heads * ch, length) * 2
    ref = legacy_qkv_attention(qkv, heads, "einsum")
    fast = legacy_qkv_attention(qkv, heads, "sdpa")
    assert_close_rel(fast, ref, rel=1e-5, name="attention")
    with pytest.raises(ValueError, match="attention_impl"):
        legacy_qkv_attention(qkv, heads, "flash")


def test_whole_unet_sdpa_and_einsum_agree_and_grads_flow() -> None:
    unet = randomize(tiny_unet(num_heads=4))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 900])
    unet.set_attention_impl("einsum")
    ref = unet(x, t)
    unet.set_attention_impl("sdpa")
    out = unet(x, t)
    assert_close_rel(out, ref, rel=1e-5, name="unet sdpa vs einsum")
    out.square().mean().backward()
    assert all(p.grad is not None for p in unet.parameters())


# --------------------------------------------------------------------------- tiny configurations


def test_fresh_unet_zero_inits_and_outputs_zero() -> None:
    unet = tiny_unet()
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Linear)}
    zeroed = [f"{n}.{k}" for n, m in layers.items() for k, p in m.named_parameters() if p.abs().sum() == 0]
    expected = {"out.2.weight", "out.2.bias"}
    for name, module in unet.named_modules():
        if isinstance(module, ResBlock):
            expected |= {f"{name}.out_layers.3.weight", f"{name}.out_layers.3.bias"}
        if isinstance(module, AttentionBlock):
            expected |= {f"{name}.proj_out.weight", f"{name}.proj_out.bias"}
    assert set(zeroed) == expected
    out = unet(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]))
    assert out.shape == (2, 3, 8, 8) and torch.equal(out, torch.zeros_like(out))


def test_attention_in_input_and_output_blocks_key_layout() -> None:
    unet = tiny_unet()
    sd = unet.state_dict()
    # level 0 (ds 1) and level 1 (ds 2) both have attention; nrb=1.
    assert sd["input_blocks.1.1.qkv.weight"].shape == (96, 32, 1)
    assert sd["input_blocks.1.1.proj_out.weight"].shape == (32, 32, 1)
    assert sd["input_blocks.2.0.op.weight"].shape == (32, 32, 3, 3)
    assert sd["input_blocks.3.0.skip_connection.weight"].shape == (64, 32, 1, 1)
    assert sd["input_blocks.3.1.qkv.weight"].shape == (192, 64, 1)
    assert sd["middle_block.1.norm.weight"].shape == (64,)
    assert sd["output_blocks.1.1.qkv.weight"].shape == (192, 64, 1)
    assert sd["output_blocks.1.2.conv.weight"].shape == (64, 64, 3, 3)  # upsample after attention
    assert sd["output_blocks.2.0.skip_connection.weight"].shape == (32, 96, 1, 1)
    assert sd["output_blocks.3.1.qkv.weight"].shape == (96, 32, 1)
    assert sd["time_embed.2.weight"].shape == (128, 128)
    assert sd["out.2.weight"].shape == (3, 32, 3, 3)
    out = randomize(unet)(torch.randn(1, 4, 16, 8), torch.tensor([10]))
    assert out.shape == (1, 3, 16, 8)


def test_num_head_channels_and_num_heads_upsample() -> None:
    unet = tiny_unet(num_heads=-1, num_head_channels=16)
    heads = {n: m.num_heads for n, m in unet.named_modules() if isinstance(m, AttentionBlock)}
    assert heads == {
        "input_blocks.1.1": 2,
        "input_blocks.3.1": 4,
        "middle_block.1": 4,
        "output_blocks.0.1": 4,
        "output_blocks.1.1": 4,
        "output_blocks.2.1": 2,
        "output_blocks.3.1": 2,
    }
    unet = tiny_unet(num_heads=2, num_heads_upsample=4)
    heads = {n: m.num_heads for n, m in unet.named_modules() if isinstance(m, AttentionBlock)}
    assert heads["input_blocks.1.1"] == 2 and heads["middle_block.1"] == 2
    assert heads["output_blocks.0.1"] == 4 and heads["output_blocks.3.1"] == 4
    out = randomize(unet)(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]))
    assert out.shape == (2, 3, 8, 8)


def test_scale_shift_norm_and_resblock_updown() -> None:
    unet = tiny_unet(use_scale_shift_norm=True, resblock_updown=True, num_res_blocks=2, dropout=0.1)
    sd = unet.state_dict()
    assert sd["input_blocks.1.0.emb_layers.1.weight"].shape == (64, 128)  # 2 * C_out
    # downsample is a ResBlock (keys in_layers/...), upsample too; no op/conv resample keys.
    assert "input_blocks.3.0.in_layers.2.weight" in sd and "input_blocks.3.0.op.weight" not in sd
    assert "output_blocks.2.2.in_layers.2.weight" in sd
    assert not any(k.endswith(".op.weight") or ".conv.weight" in k for k in sd)
    unet = randomize(unet).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 4])
    out = unet(x, t)
    assert out.shape == (2, 3, 8, 8)
    assert torch.equal(out, unet(x, t))  # eval: dropout off, deterministic


def forward_backward_probe(unet: UNetModel, x: torch.Tensor, t: torch.Tensor) -> dict[str, object]:
    """Forward and backward of ``unet`` on ``x, t``, recording what gradient checkpointing changes:
    the ResBlocks/AttentionBlocks whose layers run again during backward (the recomputation), and the
    bytes autograd keeps from the forward for the backward (the memory)."""
    blocks = {n: m for n, m in unet.named_modules() if isinstance(m, ResBlock | AttentionBlock)}
    in_backward, recomputed, saved_bytes = [False], set(), [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved_bytes[0] += tensor.numel() * tensor.element_size()
        return tensor

    def layer_runs(name: str):
        def hook(module: nn.Module, args: object) -> None:
            if in_backward[0]:
                recomputed.add(name)

        return hook

    handles = [
        layer.register_forward_pre_hook(layer_runs(name))
        for name, block in blocks.items()
        for layer in block.children()
    ]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = unet(x, t)
        in_backward[0] = True
        out.abs().mean().backward()
    finally:
        for handle in handles:
            handle.remove()
    return {"out": out, "blocks": sorted(blocks), "recomputed": sorted(recomputed), "saved": saved_bytes[0]}


def test_use_checkpoint_changes_nothing_but_memory() -> None:
    """Same outputs and gradients; every block is recomputed in backward and far less is kept from
    the forward (with use_checkpoint off, nothing runs again and everything is kept)."""
    plain = randomize(tiny_unet(use_scale_shift_norm=True))
    ckpt = tiny_unet(use_scale_shift_norm=True, use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([7, 70])
    a, b = forward_backward_probe(plain, x, t), forward_backward_probe(ckpt, x, t)
    torch.testing.assert_close(a["out"], b["out"], rtol=0, atol=0)
    for (name, p_a), p_b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(p_a.grad, p_b.grad, rtol=1e-6, atol=1e-7, msg=name)
    assert len(a["blocks"]) == 15 and a["recomputed"] == []
    assert b["recomputed"] == b["blocks"], "use_checkpoint=True: these blocks were not recomputed in backward"
    assert b["saved"] < a["saved"] / 4, (b["saved"], a["saved"])  # 0.6 MB instead of 4.7 MB here


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_classes": 10}, "num_classes=10"),
        ({"use_spatial_transformer": True}, "use_spatial_transformer=True"),
        ({"n_embed": 16}, "n_embed=16"),
        ({"dims": 3}, "dims=3"),
        ({"use_new_attention_order": True}, "use_new_attention_order=True"),
        ({"use_fp16": True}, "use_fp16=True"),
        ({"model_channels": 48}, "model_channels=48"),
        ({"model_channels": 40}, r"channel_mult=\[1, 2\]"),
        ({"num_heads": -1}, "num_heads"),
        ({"num_heads": 3}, "num_heads 3"),
        ({"num_heads": -1, "num_head_channels": 24}, "num_head_channels 24"),
        ({"attention_impl": "flash"}, "attention_impl"),
    ],
)
def test_unsupported_or_invalid_options_raise(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_unet(**kwargs)


def test_class_labels_are_rejected_at_forward() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        tiny_unet()(torch.zeros(1, 4, 8, 8), torch.zeros(1, dtype=torch.long), y=torch.zeros(1))
