"""The ways one training step can be computed: segldm's defaults, and each of them switched off or on.

A :class:`PerfMode` is applied to a built :class:`~segldm.training.ldm.LatentDiffusion` in place, so
every mode runs the same weights; :meth:`PerfMode.config_overrides` names the config keys that select
the same choices for `python -m segldm.train`. The anchor is segldm's defaults in fp32
(``optimised_fp32``); each ``-x`` variant switches one of its choices back to the way the CompVis
code computes it (leave-one-out: what that choice buys on its own), each ``+x`` adds an opt-in one.
The suite no longer emulates the whole reference: its ``reference`` section times the real CompVis
code, and an emulation of it was 6 % off (issue #15).

The CompVis ways the ``-x`` variants switch back to:

* ``-sdpa``: attention as a materialised einsum softmax, the UNet's attention blocks recomputed in
  backward (openaimodel's AttentionBlock always goes through its CheckpointFunction);
* ``-label_map``: the data loader builds the (H, W, n_labels) float one-hot, the model permutes it to
  channels-first and interpolates it at full resolution (``-fused_label_map``: the same one-hot
  built on the device from label maps);
* ``-inference_mode``: the frozen first stage under no_grad (autograd still tracks versions and views);
* ``-fused_adamw``: torch's default (per-tensor loop) AdamW.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from segldm.models.autoencoder import AttnBlock
from segldm.models.unet import AttentionBlock
from segldm.training.latent_cache import LatentCache
from segldm.training.ldm import LatentDiffusion

MASK_PATHS = ("loader_one_hot", "device_one_hot", "label_map")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class PerfMode:
    """One way to compute a training step; each field is one choice the suite can time alone."""

    attention: str = "sdpa"  # sdpa (fused kernels) | einsum (reference, recomputed in backward)
    precision: str = "bf16"  # fp32 | bf16 (autocast; the VQ distances stay fp32)
    channels_last: bool = False
    first_stage_inference_mode: bool = True  # False: no_grad, as the reference
    masks: str = "label_map"  # loader_one_hot (reference) | device_one_hot | label_map (fused)
    cached_latents: bool = False
    compile: bool = False  # torch.compile of the UNet
    compile_first_stage: bool = False  # torch.compile of the first stage's encoder
    fused_optimizer: bool = True

    def __post_init__(self) -> None:
        if self.attention not in ("sdpa", "einsum"):
            raise ValueError(f"attention must be 'sdpa' or 'einsum', got {self.attention!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.masks not in MASK_PATHS:
            raise ValueError(f"masks must be one of {MASK_PATHS}, got {self.masks!r}")

    @property
    def compiles(self) -> bool:
        """Whether this mode runs anything through torch.compile (minutes of compiling on a CPU)."""
        return self.compile or self.compile_first_stage

    def eager(self) -> PerfMode:
        """The same mode with nothing compiled: what a compiled mode's speed-up and pay-back are against."""
        return self.replace(compile=False, compile_first_stage=False)

    def replace(self, **changes: Any) -> PerfMode:
        return dataclasses.replace(self, **changes)

    def config_overrides(self, device: str = "cpu") -> list[str]:
        """The `python -m segldm.train` overrides that give this mode (relative to the defaults)."""
        out = []
        if self.attention == "einsum":
            out += ["+model.unet.attention_impl=einsum", "+model.first_stage.ddconfig.attention_impl=einsum"]
        if self.precision == "bf16":
            out.append("trainer=gpu" if device == "cuda" else "trainer=cpu_fast")
        else:  # the default precision is picked from the hardware (bf16 where native)
            out.append("trainer.precision=32-true")
        if self.channels_last:
            out.append("model.performance.channels_last=true")
        if not self.first_stage_inference_mode:
            out.append("model.performance.first_stage_inference_mode=false")
        if self.masks == "loader_one_hot":
            out.append("data.one_hot_in_loader=true")
        elif self.masks == "device_one_hot":
            out.append("model.performance.fused_label_conditioning=false")
        if self.cached_latents:
            out.append("model.performance.cache_latents=true")
        if self.compile:
            out.append("model.performance.compile=true")
        if self.compile_first_stage:
            out.append("model.performance.compile_first_stage=true")
        if not self.fused_optimizer:
            out.append("model.optimization.optimizer.fused=false")
        return out


OPTIMISED = PerfMode()

# leave-one-out from segldm's fp32 defaults: each switches one choice back to the CompVis code's way
ABLATIONS = {
    "-sdpa": {"attention": "einsum"},
    "-fused_label_map": {"masks": "device_one_hot"},
    "-label_map": {"masks": "loader_one_hot"},
    "-inference_mode": {"first_stage_inference_mode": False},
    "-fused_adamw": {"fused_optimizer": False},
}
ANCHOR = "optimised_fp32"


def variant_modes(device: torch.device, bf16: bool, channels_last: bool) -> dict[str, PerfMode]:
    """Every named variant: segldm's defaults on this device (``optimised``: bf16 where native), the
    same in fp32 (``optimised_fp32``, the anchor), the anchor with one choice switched back (``-x``)
    or an opt-in one added (``+x``), and the defaults' opt-in extras (``optimised+x``)."""
    optimised = OPTIMISED.replace(precision="bf16" if bf16 else "fp32", channels_last=channels_last)
    fp32 = optimised.replace(precision="fp32")
    return {
        ANCHOR: fp32,
        **{name: fp32.replace(**change) for name, change in ABLATIONS.items()},
        "+channels_last": fp32.replace(channels_last=True),
        "+compile": fp32.replace(compile=True),
        "+compile_first_stage": fp32.replace(compile_first_stage=True),
        "optimised": optimised,
        "optimised+channels_last": optimised.replace(channels_last=True),
        "optimised+cached_latents": optimised.replace(cached_latents=True),
        "optimised+compile": optimised.replace(compile=True),
        "optimised+compile_first_stage": optimised.replace(compile_first_stage=True),
    }


class CompiledCall:
    """A module's torch.compile'd forward switched on and off in place (kept once compiled), as
    `nn.Module.compile()` installs it: parameter names, hence checkpoints, unchanged."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.compiled = module, None

    def use(self, on: bool) -> None:
        if on and self.compiled is None:
            self.module.compile()
            self.compiled = self.module._compiled_call_impl
        self.module._compiled_call_impl = self.compiled if on else None


class ModeSwitch:
    """Puts one model into any :class:`PerfMode` and back; keeps per-mode state (latent caches,
    the compiled UNet) so that switching between rounds costs nothing that a round would time."""

    def __init__(self, model: LatentDiffusion) -> None:
        self.model = model
        self.unet = model.model.diffusion_model
        self.caches: dict[PerfMode, LatentCache] = {}
        self.compiled_unet = CompiledCall(self.unet)
        self.compiled_encoder = CompiledCall(model.first_stage_model.encoder)
        self.current: PerfMode | None = None

    def apply(self, mode: PerfMode) -> None:
        model = self.model
        for module in model.modules():
            if isinstance(module, AttentionBlock):
                module.attention_impl = mode.attention
                module.use_checkpoint = mode.attention == "einsum"  # openaimodel always recomputes it
            elif isinstance(module, AttnBlock):
                module.attention_impl = mode.attention
        model.first_stage_inference_mode = mode.first_stage_inference_mode
        model.fused_label_conditioning = mode.masks == "label_map"
        if self.current is None or self.current.channels_last != mode.channels_last:
            fmt = torch.channels_last if mode.channels_last else torch.contiguous_format
            model.model.to(memory_format=fmt)
            model.first_stage_model.to(memory_format=fmt)
        model.latent_cache = self.caches.setdefault(mode, LatentCache()) if mode.cached_latents else None
        self.compiled_unet.use(mode.compile)  # in place, as model.performance.compile=true does
        self.compiled_encoder.use(mode.compile_first_stage)
        self.current = mode


def autocast(mode: PerfMode, device: torch.device) -> torch.autocast:
    """bf16 autocast as Lightning's `precision=bf16-mixed` applies it (forward only)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode.precision == "bf16")


@dataclass
class BatchSource:
    """Fixed training data for the suite: images and blocky label maps at a config's data shape.

    Label maps are 8x8-pixel blocks of random labels (every class appears; one-hot sizes are real);
    images are random in [-1, 1]. `batch(mode)` returns what the loader would ship in that mode.
    """

    images: torch.Tensor  # (B, H, W, 3) float32
    label_maps: torch.Tensor  # (B, H, W) uint8 / int16
    n_labels: int

    @classmethod
    def make(cls, batch_size: int, size: int, n_labels: int, seed: int = 0) -> BatchSource:
        rng = np.random.default_rng(seed)
        blocks = rng.integers(0, n_labels, size=(batch_size, -(-size // 8), -(-size // 8)))
        labels = np.kron(blocks, np.ones((1, 8, 8), dtype=np.int64))[:, :size, :size]
        dtype = np.uint8 if n_labels <= 256 else np.int16
        images = rng.uniform(-1, 1, size=(batch_size, size, size, 3)).astype(np.float32)
        return cls(torch.from_numpy(images), torch.from_numpy(labels.astype(dtype)), n_labels)

    def batch(self, mode: PerfMode, device: torch.device) -> dict[str, Any]:
        out: dict[str, Any] = {
            "image": self.images.to(device, copy=True),
            "label_map": self.label_maps.to(device, copy=True),
            "index": torch.arange(self.images.shape[0]),
        }
        if mode.masks == "loader_one_hot":  # the reference sample's float one-hot, stacked by collate
            one_hot = torch.zeros((*self.label_maps.shape, self.n_labels), dtype=torch.float32)
            one_hot.scatter_(-1, self.label_maps.long().unsqueeze(-1), 1.0)
            out["segmentation"] = one_hot.to(device)
        return out


def make_optimizers(
    params: list[nn.Parameter], lr: float, weight_decay: float
) -> dict[bool, torch.optim.Optimizer]:
    """The default and the fused AdamW over the same parameters, sharing one state (so switching
    modes neither re-initialises the moments nor holds them twice); keyed by `fused_optimizer`."""
    loop = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    fused = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    fused.state = loop.state
    return {False: loop, True: fused}


def training_step(
    model: LatentDiffusion,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Any],
    mode: PerfMode,
    device: torch.device,
) -> float:
    """What Lightning runs per batch: loss (autocast), backward, AdamW step, zero_grad, EMA update."""
    with autocast(mode, device):
        loss, _ = model.shared_step(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if model.use_ema:
        model.model_ema(model.model)
    return float(loss.detach())


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def randomize_zero_parameters(model: nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Give zero-initialised layers (UNet output convs, attention projections) small random weights,
    so that timing and numerical comparisons see non-trivial activations and gradients everywhere."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.numel() and not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * std)
