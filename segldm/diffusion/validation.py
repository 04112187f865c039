"""Validation draws that rank runs: the same timestep and noise for a validation sample at every
validation, in every run and after a resume.

CompVis draws fresh random timesteps and noise at each validation, so the validation loss of one
checkpoint moves by more than the differences a sweep ranks. Here sample ``key`` (its dataset index
or file path) gets its own generator seeded from ``(seed, key)``: its noise never depends on the
batch, the step or the training random stream. Its timestep is the golden-ratio sequence
``t = floor(frac(u0 + n * phi) * T)`` over the sample's ordinal ``n``: any N consecutive samples
cover [0, T) stratified (gaps at most ~2.6 T/N), so the mean over the set estimates the loss
averaged over all timesteps with a far smaller variance than independent draws.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Hashable, Sequence

import torch

GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0  # frac(phi): the additive recurrence with the most even gaps


def key_seed(key: Hashable, seed: int) -> int:
    """A stable 63-bit seed from (seed, key) for int or str keys (Python's hash() is salted per process)."""
    text = f"{int(seed)}:{key}".encode()
    return (zlib.crc32(text) << 31 | zlib.crc32(text[::-1])) & ((1 << 63) - 1)


def stratified_timestep(ordinal: int, num_timesteps: int, offset: float = 0.5) -> int:
    """The ``ordinal``-th point of the golden-ratio sequence on [0, num_timesteps)."""
    return int(math.floor(((offset + ordinal * GOLDEN) % 1.0) * num_timesteps)) % num_timesteps


def validation_draws(
    keys: Sequence[Hashable], shape: Sequence[int], num_timesteps: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, noise) for a batch of validation samples named by ``keys``; ``shape`` is one latent's.

    Integer keys (dataset indices) are their own ordinals; other keys take one from their seed.
    """
    ts, noises = [], []
    for key in keys:
        generator = torch.Generator().manual_seed(key_seed(key, seed))
        ordinal = (
            int(key) if isinstance(key, int) else int(torch.randint(0, 2**31, (1,), generator=generator))
        )
        ts.append(stratified_timestep(ordinal, num_timesteps))
        noises.append(torch.randn(*shape, generator=generator))
    return torch.tensor(ts, dtype=torch.long, device=device), torch.stack(noises).to(device)


def mean_and_standard_error(values: torch.Tensor) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n); 0 for n = 1)."""
    values = values.double().flatten()
    if values.numel() < 2:
        return float(values.mean()), 0.0
    return float(values.mean()), float(values.std(unbiased=True) / math.sqrt(values.numel()))
