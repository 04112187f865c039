"""The CompVis ``openaimodel.UNetModel`` (legacy attention, no spatial transformer) in plain PyTorch.

Module names, parameter shapes, initialisation and numerics follow the reference exactly so that
``model.diffusion_model.*`` tensors of a CompVis ``LatentDiffusion`` checkpoint load with
``strict=True``. See ``REFERENCE_NOTES.md`` section 5 for the quirks mirrored here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from segldm.config.construction import constructor_arguments, constructor_problems
from segldm.models.attention import scaled_dot_product_attention

ATTENTION_IMPLS: tuple[str, ...] = ("sdpa", "einsum")
"""``sdpa``: fused ``scaled_dot_product_attention``; ``einsum``: the reference's materialised softmax."""

GROUPNORM_GROUPS = 32


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t f), sin(t f)]`` (cos first, as openaimodel) of shape ``(N, dim)``.

    ``f_i = exp(-ln(max_period) * i / (dim // 2))``; an odd ``dim`` gets one trailing zero column.
    Always computed in float32 from ``timesteps.float()`` like the reference.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D (N,), got shape {tuple(timesteps.shape)}")
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def attention_levels(attention_resolutions: Iterable[int], channel_mult: Sequence[int]) -> list[int]:
    """Indices of the levels that get attention: the reference tests the *downsampling factor* ``ds``.

    ``attention_resolutions`` lists ds factors (1, 2, 4, ...), not pixel sizes, so the seed's
    ``[32, 16, 8]`` with three levels (ds 1, 2, 4) selects no level: attention only in the middle block.
    """
    wanted = {int(r) for r in attention_resolutions}
    return [level for level in range(len(channel_mult)) if 2**level in wanted]


def input_multiple(channel_mult: Sequence[int]) -> int:
    """What the input's sides must be a multiple of: the UNet halves them once per level after the
    first, and its skip connections align only when every halving is exact."""
    return 2 ** (len(channel_mult) - 1)


def attention_resolution_problems(
    attention_resolutions: Iterable[int], channel_mult: Sequence[int], key: str
) -> list[str]:
    """Entries of ``attention_resolutions`` that select no level (see :func:`attention_levels`): not a
    power of two (never a downsampling factor), or a factor this UNet does not have while others match
    (the seed's ``[32, 16, 8]`` matching none is CompVis's quirk, kept: attention in the middle block)."""
    wanted, levels = [int(r) for r in attention_resolutions], list(channel_mult)
    reachable = {2**level for level in range(len(levels))}
    never = sorted(r for r in wanted if r <= 0 or r & (r - 1))
    problems = []
    if never:
        problems.append(
            f"{key}.attention_resolutions={wanted}: {never} can never match a UNet level (CompVis compares "
            f"each entry with the downsampling factor 1, 2, 4, ...; this UNet with channel_mult={levels} has "
            f"{sorted(reachable)}); use powers of two"
        )
    unused = sorted(r for r in set(wanted) - reachable if r not in never)
    if unused and set(wanted) & reachable:
        problems.append(
            f"{key}.attention_resolutions={wanted}: {unused} are not downsampling factors of this UNet (it "
            f"has {sorted(reachable)}; CompVis compares the list with the factor, not with the pixel size)"
        )
    return problems


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter in place: the reference starts residual branches (and the output) at 0."""
    for p in module.parameters():
        p.detach().zero_()
    return module


class GroupNorm32(nn.GroupNorm):
    """``GroupNorm(32, C)`` (eps 1e-5) computed in float32 and cast back (openaimodel ``normalization``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """The UNet's only normalisation layer."""
    return GroupNorm32(GROUPNORM_GROUPS, channels)


def _maybe_checkpoint(enabled: bool, fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
    """Recompute ``fn`` in backward when enabled (saves activation memory; identical values)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class TimestepBlock(nn.Module):
    """A block whose forward also takes the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """``nn.Sequential`` that passes ``emb`` to the children that are ``TimestepBlock``s."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest x2, then (optionally) a 3x3 conv; keys ``conv.*``."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(self.channels, self.out_channels, 3, padding=1)
        elif self.out_channels != channels:
            raise ValueError("Upsample without conv cannot change the channel count")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """3x3 conv with stride 2 and *symmetric* padding 1 (key ``op.*``), or a 2x2 average pool."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = nn.Conv2d(self.channels, self.out_channels, 3, stride=2, padding=1)
        else:
            if self.out_channels != channels:
                raise ValueError("Downsample without conv cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """openaimodel ``ResBlock``: GN-SiLU-conv, + timestep projection, GN-SiLU-dropout-conv(zero), + skip.

    With ``up``/``down`` (``resblock_updown``) the parameter-free resampling happens between the
    first GN-SiLU and the first conv, on both branches, exactly as the reference.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            nn.Conv2d(channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd: nn.Module = Upsample(channels, False)
            self.x_upd: nn.Module = Upsample(channels, False)
        elif down:
            self.h_upd = Downsample(channels, False)
            self.x_upd = Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return _maybe_checkpoint(self.use_checkpoint, self._forward, x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def legacy_qkv_attention(qkv: torch.Tensor, num_heads: int, impl: str = "sdpa") -> torch.Tensor:
    """openaimodel ``QKVAttentionLegacy`` on ``qkv`` of shape (B, 3*C, T) -> (B, C, T).

    The channel layout is ``[head0: q, k, v | head1: q, k, v | ...]``. ``einsum`` reproduces the
    reference literally (q and k each scaled by ``ch**-0.25``, softmax in float32); ``sdpa`` computes
    the same ``softmax(q k^T / sqrt(ch)) v`` with the fused kernel (differences at rounding level).
    """
    batch, width, length = qkv.shape
    if width % (3 * num_heads):
        raise ValueError(f"qkv width {width} is not divisible by 3 * num_heads ({num_heads})")
    ch = width // (3 * num_heads)
    if impl == "einsum":
        q, k, v = qkv.reshape(batch * num_heads, ch * 3, length).split(ch, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        a = torch.einsum("bts,bcs->bct", weight, v)
        return a.reshape(batch, -1, length)
    if impl == "sdpa":
        # the fused (flash / memory-efficient) kernels need the head dim at stride 1; with a strided
        # view sdpa silently falls back to the materialised math path
        tokens = qkv.transpose(1, 2).contiguous()  # (B, T, 3C)
        q, k, v = rearrange(tokens, "b t (h three c) -> three b h t c", three=3, h=num_heads).unbind(0)
        a = scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(ch))
        return rearrange(a, "b h t c -> b (h c) t")
    raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")


class AttentionBlock(nn.Module):
    """openaimodel ``AttentionBlock`` (legacy head order): ``x + proj_out(attn(qkv(norm(x))))``.

    ``qkv`` and ``proj_out`` are ``Conv1d`` (weights ``[3C, C, 1]`` / ``[C, C, 1]``) like the reference;
    ``proj_out`` starts at zero so the block starts as the identity.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        use_checkpoint: bool = False,
        attention_impl: str = "sdpa",
    ) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention channels {channels} are not divisible by num_heads {num_heads}")
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
        self.channels = channels
        self.num_heads = num_heads
        self.use_checkpoint = use_checkpoint
        self.attention_impl = attention_impl
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _maybe_checkpoint(self.use_checkpoint, self._forward, x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = legacy_qkv_attention(self.qkv(self.norm(x)), self.num_heads, self.attention_impl)
        h = self.proj_out(h)
        return (x + h).reshape(b, c, *spatial)


def _heads_for(ch: int, num_heads: int, num_head_channels: int, legacy: bool, heads_if_legacy: int) -> int:
    """Head count the reference ends up with (``num_head_channels`` wins; openaimodel's dim_head dance)."""
    if num_head_channels != -1:
        if ch % num_head_channels:
            raise ValueError(
                f"attention channels {ch} are not divisible by num_head_channels {num_head_channels}"
            )
        return ch // num_head_channels
    if legacy:
        return heads_if_legacy
    return ch // (ch // num_heads)


class UNetModel(nn.Module):
    """openaimodel ``UNetModel`` with the same constructor; unsupported options raise ``ValueError``.

    ``attention_resolutions`` holds downsampling factors (see :func:`attention_levels`).
    ``attention_impl`` (not in the reference) selects ``"sdpa"`` (default) or the literal ``"einsum"``.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Iterable[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: int | None = None,
        n_embed: int | None = None,
        legacy: bool = True,
        attention_impl: str = "sdpa",
    ) -> None:
        super().__init__()
        unsupported: dict[str, Any] = {
            "dims": (dims, dims != 2),
            "num_classes": (num_classes, num_classes is not None),
            "use_spatial_transformer": (use_spatial_transformer, bool(use_spatial_transformer)),
            "context_dim": (context_dim, context_dim is not None),
            "n_embed": (n_embed, n_embed is not None),
            "use_new_attention_order": (use_new_attention_order, bool(use_new_attention_order)),
            "use_fp16": (use_fp16, bool(use_fp16)),
        }
        for name, (value, bad) in unsupported.items():
            if bad:
                hint = " (use mixed precision in the trainer instead)" if name == "use_fp16" else ""
                raise ValueError(
                    f"UNetModel: {name}={value!r} is not supported by segldm (only the mask-concat "
                    f"2-D UNet of CompVis semantic synthesis is){hint}"
                )
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("UNetModel: set num_heads or num_head_channels (both are -1)")
        channel_mult = tuple(int(m) for m in channel_mult)
        attention_resolutions = tuple(int(r) for r in attention_resolutions)
        bad_channels = [
            f"model_channels*{m}={model_channels * m}"
            for m in (1, *channel_mult)
            if (model_channels * m) % GROUPNORM_GROUPS
        ]
        if bad_channels or model_channels <= 0:
            raise ValueError(
                f"UNetModel: every channel count must be a positive multiple of {GROUPNORM_GROUPS} "
                f"(GroupNorm32); model_channels={model_channels}, channel_mult={list(channel_mult)} "
                f"give {', '.join(bad_channels) or model_channels}"
            )
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resblock_updown = resblock_updown
        self.legacy = legacy
        del transformer_depth  # only meaningful with the (unsupported) spatial transformer

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )

        def res_block(ch_in: int, ch_out: int, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(
                ch_in,
                time_embed_dim,
                dropout,
                out_channels=ch_out,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
                up=up,
                down=down,
            )

        def attn_block(ch: int, heads_if_legacy: int) -> AttentionBlock:
            heads = _heads_for(ch, num_heads, num_head_channels, legacy, heads_if_legacy)
            return AttentionBlock(ch, heads, use_checkpoint=use_checkpoint, attention_impl=attention_impl)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        input_block_chans = [model_channels]
        ch = model_channels
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attn_block(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                resample = (
                    res_block(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, ch)
                )
                self.input_blocks.append(TimestepEmbedSequential(resample))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch), attn_block(ch, num_heads), res_block(ch, ch)
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                skip_ch = input_block_chans.pop()
                layers = [res_block(ch + skip_ch, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attn_block(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(
                        res_block(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        # The reference builds this conv with model_channels inputs; ch == model_channels whenever
        # channel_mult[0] == 1 (otherwise the reference itself cannot run).
        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(nn.Conv2d(ch, out_channels, 3, padding=1)),
        )

    @property
    def size_multiple(self) -> int:
        """What the sides of this UNet's input must be a multiple of (see :func:`input_multiple`)."""
        return input_multiple(self.channel_mult)

    @classmethod
    def startup_problems(cls, config: Mapping[str, Any], key: str) -> list[str]:
        """This config's problems before anything is built: the constructor's own checks (run on the
        meta device) and attention resolutions that select no level."""
        problems = constructor_problems(cls, config, key)
        arguments = constructor_arguments(cls, config)
        if "attention_resolutions" in arguments:
            problems += attention_resolution_problems(
                arguments["attention_resolutions"], arguments["channel_mult"], key
            )
        return problems

    @classmethod
    def config_channels(cls, config: Mapping[str, Any], key: str) -> tuple[int, int]:
        """(input channels, output channels) of this config: latent + condition in, the latent's out."""
        arguments = constructor_arguments(cls, config)
        return int(arguments["in_channels"]), int(arguments["out_channels"])

    @classmethod
    def config_size_multiple(cls, config: Mapping[str, Any], key: str) -> tuple[int, str]:
        """What the latent's sides must be a multiple of for this config, and the setting that says so."""
        channel_mult = list(constructor_arguments(cls, config)["channel_mult"])
        multiple = input_multiple(channel_mult)
        return multiple, (
            f"{key}.channel_mult={channel_mult}: the UNet halves its input {len(channel_mult) - 1} times and "
            "its skip connections align only when each halving is exact"
        )

    def set_attention_impl(self, impl: str) -> None:
        """Switch every AttentionBlock between ``"sdpa"`` and the reference ``"einsum"`` path."""
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
        for module in self.modules():
            if isinstance(module, AttentionBlock):
                module.attention_impl = impl

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict from ``x`` (B, in_channels, H, W) at integer ``timesteps`` (B,); H, W divisible by 2^(L-1).

        ``context`` is accepted for signature compatibility and ignored (no cross-attention);
        ``y`` must be None because class conditioning is not supported.
        """
        if y is not None:
            raise ValueError(
                "UNetModel: y was given but the model is not class-conditional (num_classes=None)"
            )
        del context
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        hs = []
        h = x.type(dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))
