"""The taming VQ autoencoder in diffusers' ``VQModel`` layout and back: config and state_dict keys.

segldm's :class:`segldm.models.autoencoder.VQModel` (taming-transformers' ``VQModel``, CompVis's
vq-f4) is the architecture diffusers ships as ``diffusers.VQModel``: the same convolutions, group
norms (eps 1e-6), single-head attention, asymmetric-padded stride-2 downsampling, nearest x2
upsampling, codebook, ``quant_conv`` and ``post_quant_conv``; only the module names differ (and
1x1 attention convolutions are linear layers there). This module translates names and configs
without importing diffusers, so a diffusers ``VQModel`` folder (``config.json`` +
``diffusion_pytorch_model.safetensors``) can be read as a first stage on any install.

What does not map (double_z, resampling without conv, ch_mult[0] != 1, non-group norms, ...) is
refused by :class:`DiffusersLayoutError` naming the option.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from segldm.storage.checkpoint_files import CheckpointError
from segldm.storage.safetensors_files import read_safetensors

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
VQ_CLASS = "VQModel"
NORM_GROUPS = 32


class DiffusersLayoutError(CheckpointError):
    """A model config or folder that does not map between segldm and diffusers (names the option)."""


# ------------------------------------------------------------------------------------------------ blocks
def _resnet(src: str, dst: str) -> list[tuple[str, str]]:
    """taming ResnetBlock -> diffusers ResnetBlock2D (``nin_shortcut`` is diffusers' ``conv_shortcut``)."""
    pairs = [(f"{src}.{n}", f"{dst}.{n}") for n in ("norm1", "conv1", "norm2", "conv2")]
    return [*pairs, (f"{src}.nin_shortcut", f"{dst}.conv_shortcut")]


def _attention(src: str, dst: str) -> list[tuple[str, str]]:
    """taming AttnBlock (1x1 convs q, k, v, proj_out) -> diffusers Attention (linear to_q, ..., to_out.0)."""
    names = (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))
    return [(f"{src}.{a}", f"{dst}.{b}") for a, b in names]


def attention_levels(ddconfig: Mapping[str, Any]) -> list[bool]:
    """Per level (0 = full resolution): whether taming puts attention there (``resolution / 2^l`` listed)."""
    wanted = {int(r) for r in ddconfig.get("attn_resolutions") or ()}
    resolution = int(ddconfig["resolution"])
    return [resolution // 2**level in wanted for level in range(len(ddconfig["ch_mult"]))]


def module_pairs(ddconfig: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(taming module prefix, diffusers module prefix) for every module holding weights."""
    levels = len(ddconfig["ch_mult"])
    blocks = int(ddconfig["num_res_blocks"])
    attn = attention_levels(ddconfig)
    pairs: list[tuple[str, str]] = [
        ("quantize.embedding", "quantize.embedding"),
        ("quant_conv", "quant_conv"),
        ("post_quant_conv", "post_quant_conv"),
    ]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_in", f"{part}.conv_in"), (f"{part}.conv_out", f"{part}.conv_out")]
        pairs += [(f"{part}.norm_out", f"{part}.conv_norm_out")]
        pairs += _resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0")
        pairs += _attention(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0")
        pairs += _resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1")
    for level in range(levels):
        down = f"encoder.down_blocks.{level}"
        for j in range(blocks):
            pairs += _resnet(f"encoder.down.{level}.block.{j}", f"{down}.resnets.{j}")
            if attn[level]:
                pairs += _attention(f"encoder.down.{level}.attn.{j}", f"{down}.attentions.{j}")
        pairs.append((f"encoder.down.{level}.downsample.conv", f"{down}.downsamplers.0.conv"))
        up = f"decoder.up_blocks.{levels - 1 - level}"  # diffusers runs (and numbers) from the lowest resolution
        for j in range(blocks + 1):
            pairs += _resnet(f"decoder.up.{level}.block.{j}", f"{up}.resnets.{j}")
            if attn[level]:
                pairs += _attention(f"decoder.up.{level}.attn.{j}", f"{up}.attentions.{j}")
        pairs.append((f"decoder.up.{level}.upsample.conv", f"{up}.upsamplers.0.conv"))
    return pairs


def _is_attention_projection(diffusers_key: str) -> bool:
    return any(f".{n}.weight" in diffusers_key for n in ("to_q", "to_k", "to_v", "to_out.0"))


def to_diffusers(
    state_dict: Mapping[str, torch.Tensor], ddconfig: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """A taming/segldm VQModel state_dict (no prefix) in diffusers ``VQModel`` names (1x1 convs -> linear)."""
    prefixes = module_pairs(ddconfig)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        target = _rename(key, prefixes)
        if target is None:
            raise DiffusersLayoutError(f"no diffusers VQModel name for the autoencoder weight {key!r}")
        out[target] = value.flatten(1) if _is_attention_projection(target) and value.ndim == 4 else value
    return out


def from_diffusers(
    state_dict: Mapping[str, torch.Tensor], ddconfig: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """A diffusers ``VQModel`` state_dict in taming/segldm names; unknown keys are kept as they are
    (strict loading then names them as unexpected)."""
    prefixes = [(b, a) for a, b in module_pairs(ddconfig)]
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        target = _rename(key, prefixes)
        if target is None:
            out[key] = value
            continue
        projection = _is_attention_projection(key) and value.ndim == 2
        out[target] = value[:, :, None, None] if projection else value
    return out


def _rename(key: str, prefixes: Sequence[tuple[str, str]]) -> str | None:
    for src, dst in prefixes:
        if key.startswith(src + "."):
            return dst + key[len(src) :]
    return None


# ------------------------------------------------------------------------------------------------ configs
def diffusers_config(
    ddconfig: Mapping[str, Any], n_embed: int, embed_dim: int, scaling_factor: float = 1.0
) -> dict[str, Any]:
    """diffusers ``VQModel`` constructor arguments for a taming ddconfig (refusing what does not map)."""
    problems = unmappable(ddconfig)
    if problems:
        raise DiffusersLayoutError(
            "this autoencoder has no diffusers VQModel equivalent: " + "; ".join(problems)
        )
    ch, mult = int(ddconfig["ch"]), [int(m) for m in ddconfig["ch_mult"]]
    attn = attention_levels(ddconfig)
    return {
        "_class_name": VQ_CLASS,
        "in_channels": int(ddconfig["in_channels"]),
        "out_channels": int(ddconfig["out_ch"]),
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)],
        "block_out_channels": [ch * m for m in mult],
        "layers_per_block": int(ddconfig["num_res_blocks"]),
        "act_fn": "silu",
        "latent_channels": int(ddconfig["z_channels"]),
        "sample_size": int(ddconfig["resolution"]),
        "num_vq_embeddings": int(n_embed),
        "norm_num_groups": NORM_GROUPS,
        "vq_embed_dim": int(embed_dim),
        "scaling_factor": float(scaling_factor),
        "norm_type": "group",
        "mid_block_add_attention": True,
        "lookup_from_codebook": False,
        "force_upcast": False,
    }


def unmappable(ddconfig: Mapping[str, Any]) -> list[str]:
    """The ddconfig options diffusers' VQModel cannot express, each with its value (empty: it maps)."""
    problems = []
    if ddconfig.get("double_z", True):
        problems.append("model.first_stage.ddconfig.double_z=true (diffusers' VQModel encoder is single-z)")
    if not ddconfig.get("resamp_with_conv", True):
        problems.append(
            "model.first_stage.ddconfig.resamp_with_conv=false (diffusers resamples with convolutions)"
        )
    if int(ddconfig["ch_mult"][0]) != 1:
        problems.append(
            f"model.first_stage.ddconfig.ch_mult[0]={ddconfig['ch_mult'][0]} (diffusers' conv_in outputs "
            "block_out_channels[0], taming's outputs ch: they agree only for ch_mult[0]=1)"
        )
    for key in ("give_pre_end", "tanh_out"):
        if ddconfig.get(key):
            problems.append(f"model.first_stage.ddconfig.{key}=true (not a diffusers VQModel option)")
    return problems


def ddconfig_from_diffusers(config: Mapping[str, Any], source: str | Path) -> tuple[dict[str, Any], int, int]:
    """(taming ddconfig, n_embed, embed_dim) of a diffusers ``VQModel`` config.json; refuses the
    settings taming cannot build, naming the config key."""
    problems = []
    expected = {
        "act_fn": "silu",
        "norm_num_groups": NORM_GROUPS,
        "norm_type": "group",
        "mid_block_add_attention": True,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
    }
    for key, value in expected.items():
        if key in config and config[key] != value:
            problems.append(f"{key}={config[key]!r} (segldm's autoencoder has {value!r})")
    channels = [int(c) for c in config.get("block_out_channels", (64,))]
    down = list(config.get("down_block_types", ("DownEncoderBlock2D",)))
    up = list(config.get("up_block_types", ("UpDecoderBlock2D",)))
    known_down = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}
    known_up = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}
    bad_types = [t for t in down if t not in known_down] + [t for t in up if t not in known_up]
    if bad_types:
        problems.append(f"block types {bad_types} (segldm maps {sorted(known_down)} and {sorted(known_up)})")
    elif len(down) != len(channels) or len(up) != len(channels):
        problems.append(
            f"{len(down)} down and {len(up)} up block types for {len(channels)} block_out_channels"
        )
    else:
        attn_down = [known_down[t] for t in down]
        attn_up = [known_up[t] for t in reversed(up)]
        if attn_down != attn_up:
            problems.append(f"attention in encoder levels {attn_down} but decoder levels {attn_up}")
    ch = channels[0]
    if any(c % ch for c in channels):
        problems.append(
            f"block_out_channels={channels} are not multiples of the first (taming's ch x ch_mult)"
        )
    if problems:
        raise DiffusersLayoutError(
            f"{source}: this diffusers VQModel does not map onto segldm's autoencoder: " + "; ".join(problems)
        )
    resolution = int(config.get("sample_size", 32))
    latent = int(config.get("latent_channels", 3))
    ddconfig = {
        "double_z": False,
        "z_channels": latent,
        "resolution": resolution,
        "in_channels": int(config.get("in_channels", 3)),
        "out_ch": int(config.get("out_channels", 3)),
        "ch": ch,
        "ch_mult": [c // ch for c in channels],
        "num_res_blocks": int(config.get("layers_per_block", 1)),
        "attn_resolutions": [resolution // 2**level for level, t in enumerate(down) if known_down[t]],
        "dropout": 0.0,
    }
    embed_dim = config.get("vq_embed_dim")
    return (
        ddconfig,
        int(config.get("num_vq_embeddings", 256)),
        int(latent if embed_dim is None else embed_dim),
    )


# ------------------------------------------------------------------------------------------------ folders
def read_vq_folder(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json, weights) of a diffusers ``VQModel`` folder; anything else is refused naming what it is."""
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        hint = ""
        if (folder / "model_index.json").is_file():
            subfolders = sorted(p.name for p in folder.iterdir() if (p / CONFIG_NAME).is_file())
            hint = (
                f" It is a diffusers pipeline folder (model_index.json; model folders {subfolders}): pass its "
                f"VQModel folder, e.g. {folder / 'vqvae'}"
            )
        raise DiffusersLayoutError(
            f"{folder} is a folder without {CONFIG_NAME}: a first stage folder must be a diffusers VQModel "
            f"(config.json + {WEIGHTS_NAME}, as VQModel.save_pretrained writes).{hint} A checkpoint file "
            "(.ckpt, .safetensors) is passed as the file itself."
        )
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise DiffusersLayoutError(f"{config_path} is not readable JSON: {err}") from err
    found = config.get("_class_name") if isinstance(config, Mapping) else None
    if found != VQ_CLASS:
        raise DiffusersLayoutError(
            f"{folder} holds a diffusers {found or 'model of unknown class'} ({config_path}: _class_name="
            f"{found!r}), not a {VQ_CLASS}: segldm's first stage is a VQ autoencoder (a VQModel folder such as "
            "the vqvae/ of a `segldm.convert diffusers` export); a KL autoencoder (AutoencoderKL) or a UNet "
            "cannot be used as model.first_stage.ckpt_path"
        )
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".safetensors"))
        raise DiffusersLayoutError(
            f"{folder} has a VQModel {CONFIG_NAME} but no {WEIGHTS_NAME}"
            + (
                f" (found {others}: re-save it with VQModel.from_pretrained(folder).save_pretrained(folder), "
                "which writes safetensors)"
                if others
                else ""
            )
        )
    tensors, _ = read_safetensors(weights)
    return dict(config), tensors


ARCHITECTURE_KEYS = ("ch", "ch_mult", "num_res_blocks", "z_channels", "in_channels", "out_ch")


def state_dict_from_vq_folder(
    folder: str | Path, ddconfig: Mapping[str, Any], n_embed: int, embed_dim: int
) -> dict[str, torch.Tensor]:
    """The weights of a diffusers ``VQModel`` folder in segldm's autoencoder names, after checking that
    its config.json describes the autoencoder of ``ddconfig`` (every difference named with its key)."""
    config, tensors = read_vq_folder(folder)
    theirs, their_n_embed, their_embed_dim = ddconfig_from_diffusers(config, folder)
    differences = [
        f"ddconfig.{key}={theirs[key]} (config has {list(ddconfig[key]) if key == 'ch_mult' else ddconfig[key]})"
        for key in ARCHITECTURE_KEYS
        if (list(ddconfig[key]) if key == "ch_mult" else ddconfig[key]) != theirs[key]
    ]
    if attention_levels(theirs) != attention_levels(ddconfig):
        differences.append(
            f"attention at levels {attention_levels(theirs)} (config's attn_resolutions="
            f"{list(ddconfig.get('attn_resolutions') or [])} at resolution {ddconfig['resolution']} give "
            f"{attention_levels(ddconfig)})"
        )
    if (their_n_embed, their_embed_dim) != (int(n_embed), int(embed_dim)):
        differences.append(
            f"n_embed={their_n_embed}, embed_dim={their_embed_dim} (config has {n_embed}, {embed_dim})"
        )
    if differences:
        raise DiffusersLayoutError(
            f"diffusers VQModel {folder} is another autoencoder than model.first_stage describes; set "
            "model.first_stage." + ", ".join(differences) + " to build its architecture"
        )
    return from_diffusers(tensors, ddconfig)


__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "DiffusersLayoutError",
    "attention_levels",
    "ddconfig_from_diffusers",
    "diffusers_config",
    "from_diffusers",
    "module_pairs",
    "read_vq_folder",
    "state_dict_from_vq_folder",
    "to_diffusers",
    "unmappable",
]
