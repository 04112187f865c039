"""segldm's UNet (CompVis ``openaimodel.UNetModel``) as diffusers' ``UNet2DModel``: config and weights.

The two are the same network in different clothes. Per level, CompVis's ``input_blocks`` are
diffusers' ``down_blocks[l]`` (``ResBlock`` = ``ResnetBlock2D``, ``AttentionBlock`` = ``Attention``
with a group norm, ``Downsample`` = ``Downsample2D``), ``middle_block`` is ``mid_block``, and the
``output_blocks`` of level l are ``up_blocks[L-1-l]`` (diffusers numbers them from the lowest
resolution, the order both run in). The timestep embedding is the same sinusoid (cos first:
``flip_sin_to_cos=True``, ``freq_shift=0``) and MLP; GroupNorm(32, eps 1e-5) throughout.

Two things are not renames: CompVis's attention computes q, k and v with one ``Conv1d`` whose
output channels are ordered head by head (``[q_h, k_h, v_h]`` for each head h, the "legacy" order),
split here into diffusers' ``to_q``/``to_k``/``to_v`` linear layers; and diffusers' UNet2DModel has
one ``attention_head_dim`` for all blocks, while CompVis fixes the number of heads
(``num_heads``) or their width (``num_head_channels``). A config whose attention blocks do not all
have the same head width has no UNet2DModel equivalent and is refused, naming the options.

Nothing here imports diffusers: the config is a dict and the weights a state_dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from segldm.models.diffusers_vq import DiffusersLayoutError
from segldm.models.unet import GROUPNORM_GROUPS, AttentionBlock, UNetModel, attention_levels

UNET_CLASS = "UNet2DModel"
RESBLOCK_NAMES = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
)


def head_width(unet: UNetModel) -> int:
    """The one attention head width of every attention block (diffusers' ``attention_head_dim``)."""
    widths = sorted(
        {
            (m.channels // m.num_heads, m.channels, m.num_heads)
            for m in unet.modules()
            if isinstance(m, AttentionBlock)
        }
    )
    if len({w for w, _, _ in widths}) != 1:
        shown = ", ".join(f"{c} channels / {h} heads = {w}" for w, c, h in widths)
        raise DiffusersLayoutError(
            f"the UNet's attention blocks have different head widths ({shown}; model.unet.num_heads="
            f"{unet.num_heads}, num_head_channels={unet.num_head_channels}, num_heads_upsample="
            f"{unet.num_heads_upsample}), but diffusers' UNet2DModel has one attention_head_dim for every block. "
            "Models trained with model.unet.num_head_channels=<width> (or attention only at one channel "
            "count) export; this one cannot be expressed as a UNet2DModel"
        )
    return widths[0][0]


def unmappable(unet: UNetModel) -> list[str]:
    """The UNet options UNet2DModel cannot express (empty: it maps), each with its value."""
    problems = []
    if unet.channel_mult[0] != 1:
        problems.append(
            f"model.unet.channel_mult[0]={unet.channel_mult[0]} (UNet2DModel's conv_in outputs block_out_channels[0], "
            "CompVis's outputs model_channels)"
        )
    if not unet.conv_resample:
        problems.append("model.unet.conv_resample=false (UNet2DModel down/upsamples with convolutions)")
    return problems


def diffusers_unet_config(unet: UNetModel) -> dict[str, Any]:
    """``UNet2DModel`` constructor arguments that build this UNet (refusing what does not map)."""
    problems = unmappable(unet)
    if problems:
        raise DiffusersLayoutError(
            "this UNet has no diffusers UNet2DModel equivalent: " + "; ".join(problems)
        )
    width = head_width(unet)
    levels = attention_levels(unet.attention_resolutions, unet.channel_mult)
    attn = [level in levels for level in range(len(unet.channel_mult))]
    updown = bool(unet.resblock_updown)
    plain_down, plain_up = (
        ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if updown else ("DownBlock2D", "UpBlock2D")
    )
    return {
        "_class_name": UNET_CLASS,
        "sample_size": int(unet.image_size),
        "in_channels": int(unet.in_channels),
        "out_channels": int(unet.out_channels),
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "freq_shift": 0,
        "flip_sin_to_cos": True,
        "down_block_types": ["AttnDownBlock2D" if a else plain_down for a in attn],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if a else plain_up for a in reversed(attn)],
        "block_out_channels": [int(unet.model_channels * m) for m in unet.channel_mult],
        "layers_per_block": int(unet.num_res_blocks),
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "downsample_type": "resnet" if updown else "conv",
        "upsample_type": "resnet" if updown else "conv",
        "dropout": float(unet.dropout),
        "act_fn": "silu",
        "attention_head_dim": width,
        "norm_num_groups": GROUPNORM_GROUPS,
        # explicit: with scale-shift norm UNet2DModel would otherwise build the middle attention without a norm
        "attn_norm_num_groups": GROUPNORM_GROUPS,
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift" if unet.use_scale_shift_norm else "default",
        "add_attention": True,
    }


def module_pairs(unet: UNetModel) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(renamed module prefixes, attention blocks) as (CompVis prefix, diffusers prefix) pairs."""
    levels = len(unet.channel_mult)
    blocks = int(unet.num_res_blocks)
    attn_levels = set(attention_levels(unet.attention_resolutions, unet.channel_mult))
    renames: list[tuple[str, str]] = [
        ("time_embed.0", "time_embedding.linear_1"),
        ("time_embed.2", "time_embedding.linear_2"),
        ("input_blocks.0.0", "conv_in"),
        ("out.0", "conv_norm_out"),
        ("out.2", "conv_out"),
    ]
    attentions: list[tuple[str, str]] = [("middle_block.1", "mid_block.attentions.0")]

    def resblock(src: str, dst: str) -> None:
        renames.extend((f"{src}.{a}", f"{dst}.{b}") for a, b in RESBLOCK_NAMES)

    resblock("middle_block.0", "mid_block.resnets.0")
    resblock("middle_block.2", "mid_block.resnets.1")
    index = 1
    for level in range(levels):
        for j in range(blocks):
            resblock(f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{j}")
            if level in attn_levels:
                attentions.append((f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{j}"))
            index += 1
        if level != levels - 1:
            if unet.resblock_updown:
                resblock(f"input_blocks.{index}.0", f"down_blocks.{level}.downsamplers.0")
            else:
                renames.append((f"input_blocks.{index}.0.op", f"down_blocks.{level}.downsamplers.0.conv"))
            index += 1
    index = 0
    for level in reversed(range(levels)):
        up = f"up_blocks.{levels - 1 - level}"
        for j in range(blocks + 1):
            resblock(f"output_blocks.{index}.0", f"{up}.resnets.{j}")
            layer = 1
            if level in attn_levels:
                attentions.append((f"output_blocks.{index}.1", f"{up}.attentions.{j}"))
                layer = 2
            if level and j == blocks:
                if unet.resblock_updown:
                    resblock(f"output_blocks.{index}.{layer}", f"{up}.upsamplers.0")
                else:
                    renames.append((f"output_blocks.{index}.{layer}.conv", f"{up}.upsamplers.0.conv"))
            index += 1
    return renames, attentions


def _split_qkv(tensor: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Legacy-order qkv rows ``[q_0, k_0, v_0, q_1, ...]`` (per head) -> q, k, v rows ``[head_0, head_1, ...]``."""
    rows = tensor.shape[0]
    grouped = tensor.reshape(heads, 3, rows // (3 * heads), *tensor.shape[1:])
    return tuple(grouped[:, i].reshape(rows // 3, *tensor.shape[1:]).clone() for i in range(3))  # type: ignore[return-value]


def to_diffusers(state_dict: Mapping[str, torch.Tensor], unet: UNetModel) -> dict[str, torch.Tensor]:
    """The UNet's state_dict (keys without ``model.diffusion_model.``) in ``UNet2DModel`` names."""
    renames, attentions = module_pairs(unet)
    heads = {
        name: module.num_heads for name, module in unet.named_modules() if isinstance(module, AttentionBlock)
    }
    out: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for src, dst in attentions:
        if src not in heads:
            raise DiffusersLayoutError(f"expected an attention block at {src} of the UNet, found none")
        qkv_w, qkv_b = state_dict[f"{src}.qkv.weight"], state_dict[f"{src}.qkv.bias"]
        for name, w, b in zip(
            ("to_q", "to_k", "to_v"),
            _split_qkv(qkv_w[..., 0], heads[src]),
            _split_qkv(qkv_b, heads[src]),
            strict=True,
        ):
            out[f"{dst}.{name}.weight"], out[f"{dst}.{name}.bias"] = w, b
        out[f"{dst}.to_out.0.weight"] = state_dict[f"{src}.proj_out.weight"][..., 0]
        out[f"{dst}.to_out.0.bias"] = state_dict[f"{src}.proj_out.bias"]
        out[f"{dst}.group_norm.weight"] = state_dict[f"{src}.norm.weight"]
        out[f"{dst}.group_norm.bias"] = state_dict[f"{src}.norm.bias"]
        done.update(
            f"{src}.{n}"
            for n in (
                "qkv.weight",
                "qkv.bias",
                "proj_out.weight",
                "proj_out.bias",
                "norm.weight",
                "norm.bias",
            )
        )
    for key, value in state_dict.items():
        if key in done:
            continue
        target = next((dst + key[len(src) :] for src, dst in renames if key.startswith(src + ".")), None)
        if target is None:
            raise DiffusersLayoutError(f"no UNet2DModel name for the UNet weight {key!r}")
        out[target] = value
    return out


__all__ = ["UNET_CLASS", "diffusers_unet_config", "head_width", "module_pairs", "to_diffusers", "unmappable"]
