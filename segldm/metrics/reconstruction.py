"""First-stage reconstruction quality: reconstructions of real images and their L1, PSNR and LPIPS.

Images are uint8 (H, W, 3) arrays, as the generated images of `segldm.eval`, so rFID, L1 and PSNR
are measured on what is written to disk.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from segldm.config.progress import tqdm  # plain lines when piped (not \r bars)
from segldm.metrics.metric import EvalSet


def to_model_input(images: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    """uint8 (H, W, 3) images -> float (B, 3, H, W) in [-1, 1]."""
    batch = torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2).float()
    return batch / 127.5 - 1.0


def to_uint8_images(x: torch.Tensor) -> list[np.ndarray]:
    """(B, 3, H, W) in [-1, 1] -> list of uint8 (H, W, 3), rounded as segldm.sample.to_uint8."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return list(x.permute(0, 2, 3, 1).numpy().astype(np.uint8))


@torch.no_grad()
def reconstruct(
    vq: nn.Module,
    images: Sequence[np.ndarray],
    batch_size: int,
    device: torch.device,
    desc: str = "reconstructing",
) -> list[np.ndarray]:
    """``vq.decode(vq.encode(x))`` (quantised, as the LDM decodes) of each image, batched by size."""
    out: list[np.ndarray] = [np.empty(0, np.uint8)] * len(images)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(i)
    with tqdm(total=len(images), desc=desc, unit="img") as progress:
        for indices in by_shape.values():
            for start in range(0, len(indices), max(1, batch_size)):
                chunk = indices[start : start + batch_size]
                x = to_model_input([images[i] for i in chunk], device)
                for i, image in zip(chunk, to_uint8_images(vq.decode(vq.encode(x))), strict=True):
                    out[i] = image
                progress.update(len(chunk))
    return out


def first_stage_reconstructions(images: EvalSet, batch_size: int) -> list[np.ndarray] | None:
    """The evaluated LDM's first stage's reconstructions of the real images, made once per evaluation
    for every metric that reads them (the ceilings: rFID, the reconstructions' mIoU); None without an
    LDM or real images."""
    model = images.model
    if images.real is None or model is None or not hasattr(model, "first_stage_model"):
        return None
    real = images.real

    def make() -> list[np.ndarray]:
        device = next(model.parameters()).device
        return reconstruct(
            model.first_stage_model, real, batch_size, device, desc="first-stage reconstructions"
        )

    return images.shared_value("first_stage_reconstructions", make)


def l1_error(real: Sequence[np.ndarray], other: Sequence[np.ndarray]) -> float:
    """Mean absolute difference on the [-1, 1] scale (the first stage's training L1)."""
    total = sum(
        float(np.abs(a.astype(np.float64) - b.astype(np.float64)).sum())
        for a, b in zip(real, other, strict=True)
    )
    count = sum(a.size for a in real)
    return total / count / 127.5


def psnr(real: Sequence[np.ndarray], other: Sequence[np.ndarray]) -> float:
    """Mean over images of 10 log10(255^2 / MSE) in dB (identical images count as 100 dB)."""
    values = []
    for a, b in zip(real, other, strict=True):
        mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
        values.append(100.0 if mse == 0 else 10 * np.log10(255.0**2 / mse))
    return float(np.mean(values))


@torch.no_grad()
def mean_lpips(
    lpips: nn.Module,
    real: Sequence[np.ndarray],
    other: Sequence[np.ndarray],
    batch_size: int,
    device: torch.device,
) -> float:
    """Mean LPIPS distance (eval mode) between paired images."""
    lpips = lpips.eval()
    values = []
    for start in range(0, len(real), max(1, batch_size)):
        a = to_model_input(real[start : start + batch_size], device)
        b = to_model_input(other[start : start + batch_size], device)
        values.append(lpips(a, b).flatten().cpu())
    return float(torch.cat(values).mean())
