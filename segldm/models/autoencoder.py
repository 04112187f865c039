"""The taming-transformers VQ autoencoder (``Encoder``, ``Decoder``, ``VectorQuantizer2``, ``VQModel``).

Key layout, initialisation and numerics follow CompVis ``vq-f4`` exactly (``REFERENCE_NOTES.md``
section 3) so its checkpoint, or the ``first_stage_model.*`` part of an LDM checkpoint, loads with
``strict=True`` via :func:`load_first_stage_weights`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from segldm.config.construction import constructor_arguments, constructor_problems
from segldm.config.derived import downsample_factor
from segldm.errors import MissingFileError
from segldm.models.attention import scaled_dot_product_attention
from segldm.models.diffusers_vq import state_dict_from_vq_folder
from segldm.storage.checkpoint_files import (
    CheckpointError,
    read_checkpoint,
    state_dict_of,
    state_dict_problems,
)

ATTENTION_IMPLS: tuple[str, ...] = ("sdpa", "einsum")

FIRST_STAGE_HELP = (
    "Train one with `python -m segldm.train model=autoencoder` (`experiment=quickstart_autoencoder`: the "
    "CPU-sized one; `make train` trains both stages), or download the CompVis vq-f4 autoencoder from "
    "https://ommer-lab.com/files/latent-diffusion/vq-f4.zip and unzip it so that the file is "
    "models/first_stage_models/vq-f4/model.ckpt."
)


def missing_checkpoint_problem(
    ckpt_path: str | Path | None, key: str = "model.first_stage.ckpt_path"
) -> str | None:
    """Why ``ckpt_path`` cannot be loaded because it is not there (a file, or a diffusers VQModel folder)."""
    if ckpt_path is None or Path(ckpt_path).exists():
        return None
    return f"{key}={ckpt_path} does not exist. {FIRST_STAGE_HELP}"


def Normalize(in_channels: int) -> nn.GroupNorm:  # noqa: N802 - reference name
    """taming's normalisation: ``GroupNorm(32, C, eps=1e-6)`` (the UNet uses eps 1e-5)."""
    return nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    """Swish ``x * sigmoid(x)`` written out as the reference does."""
    return x * torch.sigmoid(x)


class Upsample(nn.Module):
    """Nearest x2, then an optional 3x3 conv (padding 1)."""

    def __init__(self, in_channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    """Zero-pad right/bottom by 1 then a 3x3 stride-2 conv without padding (asymmetric, unlike the UNet)."""

    def __init__(self, in_channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    """norm1-swish-conv1 (+temb) -> norm2-swish-dropout-conv2, plus a (1x1 ``nin_shortcut``) skip."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        conv_shortcut: bool = False,
        dropout: float = 0.0,
        temb_channels: int = 0,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.use_conv_shortcut = conv_shortcut
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(nonlinearity(self.norm1(x)))
        if temb is not None:
            h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv ``q, k, v, proj_out``; returns ``x + h``.

    ``einsum`` reproduces the reference (``softmax(q^T k * C^-0.5)`` in the input dtype); ``sdpa`` is the
    same computation through ``scaled_dot_product_attention`` (no materialised HW x HW matrix).
    """

    def __init__(self, in_channels: int, attention_impl: str = "sdpa") -> None:
        super().__init__()
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
        self.in_channels = in_channels
        self.attention_impl = attention_impl
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, height, width = q.shape
        if self.attention_impl == "einsum":
            q = rearrange(q, "b c h w -> b (h w) c")
            k = rearrange(k, "b c h w -> b c (h w)")
            weights = torch.softmax(torch.bmm(q, k) * (int(c) ** (-0.5)), dim=2)  # (b, query, key)
            v = rearrange(v, "b c h w -> b c (h w)")
            h_ = torch.bmm(v, weights.permute(0, 2, 1))  # (b, c, query)
            h_ = rearrange(h_, "b c (h w) -> b c h w", h=height, w=width)
        else:
            # contiguous: the fused kernels need the channel dim at stride 1 (else the math fallback
            # materialises the (HW x HW) matrix: 512 MiB for a batch of 8 at the f4 latent of 256 px)
            q, k, v = (rearrange(t, "b c h w -> b 1 (h w) c").contiguous() for t in (q, k, v))
            h_ = scaled_dot_product_attention(q, k, v, scale=int(c) ** (-0.5))
            h_ = rearrange(h_, "b 1 (h w) c -> b c h w", h=height, w=width)
        return x + self.proj_out(h_)


class _Level(nn.Module):
    """Gives the reference's ``down.{l}`` / ``up.{l}`` key names (``block``, ``attn``, resample)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    """``mid.block_1 -> mid.attn_1 -> mid.block_2``; the attention is always present."""

    def __init__(self, channels: int, dropout: float, attention_impl: str) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(in_channels=channels, out_channels=channels, dropout=dropout)
        self.attn_1 = AttnBlock(channels, attention_impl)
        self.block_2 = ResnetBlock(in_channels=channels, out_channels=channels, dropout=dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


def _check_ddconfig(ch: int, ch_mult: Sequence[int]) -> None:
    bad = [ch * m for m in (1, *ch_mult) if (ch * m) % 32]
    if ch <= 0 or bad:
        raise ValueError(
            f"autoencoder: every channel count must be a positive multiple of 32 (GroupNorm 32); "
            f"ch={ch}, ch_mult={list(ch_mult)} give {bad or ch}"
        )


class Encoder(nn.Module):
    """taming ``Encoder``. Attention placement follows ``curr_res`` counted from the config's
    ``resolution`` (not the real input size), halving at each downsample.
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Iterable[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        give_pre_end: bool = False,
        tanh_out: bool = False,
        attention_impl: str = "sdpa",
    ) -> None:
        super().__init__()
        del out_ch, give_pre_end, tanh_out  # decoder-only ddconfig keys (the reference shares one dict)
        ch_mult = tuple(int(m) for m in ch_mult)
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        _check_ddconfig(ch, ch_mult)
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        curr_res = resolution
        in_ch_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            level = _Level()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in, attention_impl))
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample(block_in, resamp_with_conv)
                curr_res = curr_res // 2
            self.down.append(level)

        self.mid = _Mid(block_in, dropout, attention_impl)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(
            block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1, padding=1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i_level, level in enumerate(self.down):
            for i_block, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(nonlinearity(self.norm_out(h)))


class Decoder(nn.Module):
    """taming ``Decoder``: ``up.{l}`` is indexed by level (``up.0`` is full resolution and runs last)."""

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Iterable[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        give_pre_end: bool = False,
        tanh_out: bool = False,
        attention_impl: str = "sdpa",
    ) -> None:
        super().__init__()
        del in_channels, double_z  # encoder-only ddconfig keys
        ch_mult = tuple(int(m) for m in ch_mult)
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        _check_ddconfig(ch, ch_mult)
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out

        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _Mid(block_in, dropout, attention_impl)

        levels: list[_Level] = []
        for i_level in reversed(range(self.num_resolutions)):
            level = _Level()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in, attention_impl))
            if i_level != 0:
                level.upsample = Upsample(block_in, resamp_with_conv)
                curr_res = curr_res * 2
            levels.append(level)
        self.up = nn.ModuleList(levels[::-1])

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for i_block, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != 0:
                h = level.upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(nonlinearity(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h


class VectorQuantizer(nn.Module):
    """taming ``VectorQuantizer2`` (no remap): nearest codebook entry with a straight-through output.

    Returns ``(z_q, loss, (None, None, indices))`` with ``z_q`` in BCHW computed as
    ``z + (e - z).detach()`` and ``indices`` flat ``(B*H*W,)`` (``(B, H, W)`` with sane_index_shape).
    ``legacy=True`` keeps the reference's swapped beta: ``mean((sg[e]-z)^2) + beta*mean((e-sg[z])^2)``.
    """

    def __init__(
        self,
        n_e: int,
        e_dim: int,
        beta: float = 0.25,
        legacy: bool = True,
        remap: Any = None,
        sane_index_shape: bool = False,
    ) -> None:
        super().__init__()
        if remap is not None:
            raise ValueError(f"VectorQuantizer: remap={remap!r} is not supported (only remap=None)")
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.legacy = legacy
        self.sane_index_shape = sane_index_shape
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[None, None, torch.Tensor]]:
        if z.ndim != 4 or z.shape[1] != self.e_dim:
            raise ValueError(f"VectorQuantizer expects (B, {self.e_dim}, H, W), got {tuple(z.shape)}")
        z = rearrange(z, "b c h w -> b h w c").contiguous()
        z_flat = z.view(-1, self.e_dim)
        # Same association order as the reference: |z|^2 + |e|^2 - 2 z.e (argmin ties -> first index).
        # Always float32, also under autocast: half-precision distances would flip near-ties.
        with torch.autocast(device_type=z.device.type, enabled=False):
            z32, w32 = z_flat.float(), self.embedding.weight.float()
            d = (
                torch.sum(z32**2, dim=1, keepdim=True)
                + torch.sum(w32**2, dim=1)
                - 2 * torch.einsum("bd,dn->bn", z32, rearrange(w32, "n d -> d n"))
            )
            indices = torch.argmin(d, dim=1)
        z_q = self.embedding(indices).view(z.shape)
        if self.legacy:
            loss = torch.mean((z_q.detach() - z) ** 2) + self.beta * torch.mean((z_q - z.detach()) ** 2)
        else:
            loss = self.beta * torch.mean((z_q.detach() - z) ** 2) + torch.mean((z_q - z.detach()) ** 2)
        z_q = z + (z_q - z).detach()
        z_q = rearrange(z_q, "b h w c -> b c h w").contiguous()
        if self.sane_index_shape:
            indices = indices.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])
        return z_q, loss, (None, None, indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape: Sequence[int] | None = None) -> torch.Tensor:
        """Codebook vectors for ``indices``; with ``shape=(B, H, W, C)`` returned as BCHW."""
        z_q = self.embedding(indices)
        if shape is not None:
            z_q = z_q.view(*shape).permute(0, 3, 1, 2).contiguous()
        return z_q


class VQModel(nn.Module):
    """The CompVis first stage (``VQModelInterface`` semantics) with keys ``encoder.*, decoder.*,
    quantize.embedding.weight, quant_conv.*, post_quant_conv.*`` and no prefix.

    :meth:`encode` returns the *pre-quantisation* latent (what the LDM diffuses); :meth:`decode`
    quantizes it first unless ``force_not_quantize``. The loss (LPIPS/discriminator) is not part of it.
    """

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        n_embed: int,
        embed_dim: int,
        ckpt_path: str | Path | None = None,
        ignore_keys: Sequence[str] = ("loss.",),
        beta: float = 0.25,
        remap: Any = None,
        sane_index_shape: bool = False,
    ) -> None:
        super().__init__()
        missing = missing_checkpoint_problem(ckpt_path)
        if missing:  # before building anything
            raise MissingFileError(missing)
        ddconfig = dict(ddconfig)
        self.ddconfig = ddconfig
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        self.loaded_from: str | None = None  # set by load_first_stage_weights
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quantize = VectorQuantizer(
            n_embed, embed_dim, beta=beta, remap=remap, sane_index_shape=sane_index_shape
        )
        z_channels = int(ddconfig["z_channels"])
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.loaded_from: str | None = None  # the checkpoint the weights came from (None: fresh init)
        if ckpt_path is not None:
            load_first_stage_weights(self, ckpt_path, ignore_keys)
            self.loaded_from = str(ckpt_path)

    @property
    def downsample_factor(self) -> int:
        """Spatial reduction image -> latent (4 for vq-f4)."""
        return downsample_factor(self.ddconfig["ch_mult"])

    @classmethod
    def startup_problems(cls, config: Mapping[str, Any], key: str) -> list[str]:
        """A checkpoint that is not there, and the constructor's own checks (the encoder and decoder
        built on the meta device, without reading the checkpoint)."""
        missing = missing_checkpoint_problem(config.get("ckpt_path"), f"{key}.ckpt_path")
        return ([missing] if missing else []) + constructor_problems(cls, {**config, "ckpt_path": None}, key)

    @classmethod
    def config_downsample_factor(cls, config: Mapping[str, Any], key: str) -> tuple[int, str]:
        """Spatial reduction image -> latent of this config, and the setting that gives it."""
        ch_mult = list(dict(config["ddconfig"])["ch_mult"])
        return downsample_factor(ch_mult), f"{key}.ddconfig.ch_mult={ch_mult}"

    @classmethod
    def config_latent_channels(cls, config: Mapping[str, Any], key: str) -> tuple[int, str]:
        """Channels of the latent this config gives the LDM, and the setting that gives them."""
        embed_dim = int(constructor_arguments(cls, config)["embed_dim"])
        return embed_dim, f"{key}.embed_dim={embed_dim}"

    @property
    def latent_channels(self) -> int:
        """Channels of the latent the LDM works on (``embed_dim``)."""
        return self.embed_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-quantisation latent ``quant_conv(encoder(x))`` (VQModelInterface.encode)."""
        return self.quant_conv(self.encoder(x))

    def quantize_latent(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z_q straight-through BCHW, codebook loss, indices (B, H, W))`` for a latent ``h``."""
        z_q, qloss, (_, _, indices) = self.quantize(h)
        return z_q, qloss, indices.reshape(h.shape[0], h.shape[2], h.shape[3])

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        """Image from a latent: quantize (unless ``force_not_quantize``) -> post_quant_conv -> decoder."""
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, indices: torch.Tensor) -> torch.Tensor:
        """Image from codebook indices of shape (B, H, W)."""
        if indices.ndim != 3:
            raise ValueError(f"decode_code expects indices of shape (B, H, W), got {tuple(indices.shape)}")
        quant = rearrange(self.quantize.embedding(indices), "b h w c -> b c h w")
        return self.decoder(self.post_quant_conv(quant))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(reconstruction, codebook loss, indices (B, H, W))`` for first-stage training."""
        z_q, qloss, indices = self.quantize_latent(self.encode(x))
        return self.decode(z_q, force_not_quantize=True), qloss, indices


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """``state_dict`` of a checkpoint file (Lightning/CompVis ``{"state_dict": ...}`` or a bare one).

    Read safely by :func:`segldm.runtime.loading.read_checkpoint` (weights_only). Raises
    ``FileNotFoundError`` for a missing file and :class:`CheckpointError` (a ``ValueError``) naming the
    file when it is not a readable tensor checkpoint.
    """
    what = "first-stage checkpoint"
    checkpoint = read_checkpoint(path, what=what, missing_help=FIRST_STAGE_HELP)
    return state_dict_of(checkpoint, path, what)


def select_first_stage_keys(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Pick the VQ tensors out of a CompVis VQ / segldm Lightning (``vq.``) / LDM (``first_stage_model.``)
    state_dict, prefixes stripped. Returns ``(state_dict, layout)`` with layout one of ``"ldm"``,
    ``"lightning"``, ``"vq"``.
    """
    for prefix, layout in (("first_stage_model.", "ldm"), ("vq.", "lightning")):
        picked = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if picked:
            return picked, layout
    return dict(state_dict), "vq"


def load_first_stage_weights(
    module: nn.Module, path: str | Path, ignore_keys: Sequence[str] = ("loss.",)
) -> None:
    """Load first-stage weights from ``path`` into ``module`` strictly.

    Accepts a CompVis VQ checkpoint (keys without prefix), a segldm autoencoder Lightning checkpoint
    (prefix ``vq.``) or an LDM checkpoint (prefix ``first_stage_model.``), as ``.ckpt`` or
    ``.safetensors``, or a diffusers ``VQModel`` folder (:mod:`segldm.models.diffusers_vq`). Keys
    starting with ``loss.`` (the LPIPS/discriminator, never part of this module) or any ``ignore_keys``
    prefix are dropped;
    every other missing/unexpected key or shape mismatch raises :class:`CheckpointError` naming the
    file. On success ``module.loaded_from`` is set to the path (the LDM checks it).
    """
    if Path(path).is_dir():  # a diffusers VQModel folder (config.json + safetensors weights)
        state_dict, layout = (
            state_dict_from_vq_folder(path, module.ddconfig, module.n_embed, module.embed_dim),
            "diffusers",
        )
    else:
        state_dict, layout = select_first_stage_keys(read_state_dict(path))
    prefixes = ("loss.", *ignore_keys)
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}
    problems = state_dict_problems(module.state_dict(), state_dict)
    codebook = state_dict.get("quantize.embedding.weight")
    own_codebook = module.state_dict().get("quantize.embedding.weight")
    if codebook is not None and own_codebook is not None and codebook.shape != own_codebook.shape:
        problems.insert(
            0,
            f"its codebook has {codebook.shape[0]} codes of dimension {codebook.shape[1]}, the config "
            f"{own_codebook.shape[0]} of {own_codebook.shape[1]} (set model.first_stage.n_embed / embed_dim to "
            "the checkpoint's)",
        )
    if problems:
        raise CheckpointError(
            f"first-stage checkpoint {path} (layout {layout!r}) does not match the autoencoder "
            f"config: " + " | ".join(problems)
        )
    module.load_state_dict(state_dict, strict=True)
    module.loaded_from = str(path)


__all__ = [
    "AttnBlock",
    "CheckpointError",
    "Decoder",
    "Downsample",
    "Encoder",
    "Normalize",
    "ResnetBlock",
    "Upsample",
    "VQModel",
    "VectorQuantizer",
    "load_first_stage_weights",
    "read_state_dict",
    "select_first_stage_keys",
]
