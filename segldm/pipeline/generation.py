"""The one generation path: masks -> conditioning -> sampler -> decode -> images, one seed per sample.

Training's sample grids, ``segldm.sample`` and ``segldm.eval`` all call :func:`generate`. Masks of
the same size are batched together (``batch_size`` at most); sample i is drawn with its own
generator seeded ``seeds[i]``, so an image does not depend on the batch it was drawn in. A mask is
an integer label map (H, W), which the model turns into conditioning without building its one-hot
(the fused label-map path), or a float one-hot (C, H, W) as the reference's loaders ship it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from segldm.config.progress import tqdm  # plain lines when piped (not \r bars)


class MaskToImageModel(Protocol):
    """What generation needs of a model (segldm's LatentDiffusion, also when loaded from CompVis)."""

    device: torch.device

    def generate(
        self,
        segmentation: torch.Tensor,
        steps: int | None = ...,
        eta: float | None = ...,
        seeds: Sequence[int] | None = ...,
        use_ema: bool = ...,
        progress: bool = ...,
        sampler: str | None = ...,
        guidance_scale: float | None = ...,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class SamplingSettings:
    """Sampler name, steps, eta and guidance (None: the model's ``model.sampler`` defaults), EMA, batch size."""

    sampler: str | None = None
    steps: int | None = None
    eta: float | None = None
    use_ema: bool = True
    batch_size: int = 16
    guidance_scale: float | None = None  # classifier-free guidance (None: model.sampler.guidance_scale)


@dataclass
class Generated:
    """Images (3, H, W) in [-1, 1] on the CPU, in mask order, and the UNet evaluations they cost."""

    images: list[torch.Tensor]
    unet_evaluations: int = 0
    batches: list[list[int]] = field(default_factory=list)

    def uint8(self) -> list[np.ndarray]:
        return list(to_uint8(torch.stack(self.images))) if self.images else []


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else as torch understands it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return images.permute(0, 2, 3, 1).numpy().astype(np.uint8)


def as_condition(mask: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A label map (H, W) as int64, or a one-hot (C, H, W) as float32."""
    tensor = (
        mask if torch.is_tensor(mask) else torch.from_numpy(np.array(mask))
    )  # a copy: masks may be read-only
    if tensor.ndim == 2:
        return tensor.long()
    if tensor.ndim == 3:
        return tensor.float()
    raise ValueError(f"a mask is a label map (H, W) or a one-hot (C, H, W), got shape {tuple(tensor.shape)}")


def batches_by_shape(conditions: Sequence[torch.Tensor], batch_size: int) -> list[list[int]]:
    """Indices grouped by mask shape (first-seen order), cut into batches of at most ``batch_size``."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, condition in enumerate(conditions):
        by_shape.setdefault(tuple(condition.shape), []).append(i)
    size = max(1, int(batch_size))
    return [idx[start : start + size] for idx in by_shape.values() for start in range(0, len(idx), size)]


def unet_of(model: Any) -> torch.nn.Module | None:
    return getattr(getattr(model, "model", None), "diffusion_model", None)


@torch.no_grad()
def generate(
    model: MaskToImageModel,
    masks: Sequence[np.ndarray | torch.Tensor],
    seeds: Sequence[int],
    settings: SamplingSettings,
    progress: str | None = "generating",
) -> Generated:
    """One image per mask, sample i seeded with ``seeds[i]``; ``progress``: the bar's label (None: no bar)."""
    if len(masks) != len(seeds):
        raise ValueError(f"{len(masks)} masks but {len(seeds)} seeds: one seed per mask")
    conditions = [as_condition(m) for m in masks]
    images: list[torch.Tensor] = [torch.empty(0)] * len(conditions)
    calls: list[int] = []
    unet = unet_of(model)
    hook = (
        unet.register_forward_hook(lambda m, i, o: calls.append(int(o.shape[0])))
        if unet is not None
        else None
    )
    batches = batches_by_shape(conditions, settings.batch_size)
    try:
        with tqdm(total=len(conditions), desc=progress, unit="img", disable=progress is None) as bar:
            for batch in batches:
                out = model.generate(
                    torch.stack([conditions[i] for i in batch]).to(model.device),
                    steps=settings.steps,
                    eta=settings.eta,
                    seeds=[int(seeds[i]) for i in batch],
                    use_ema=settings.use_ema,
                    sampler=settings.sampler,
                    guidance_scale=settings.guidance_scale,
                )
                for row, i in enumerate(batch):
                    images[i] = out[row].float().cpu()
                bar.update(len(batch))
    finally:
        if hook is not None:
            hook.remove()
    return Generated(images, sum(calls), batches)
