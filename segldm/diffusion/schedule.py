"""Noise schedules and the DDPM forward process, as pure functions over tensors.

The buffers follow the CompVis reference exactly: computed in float64 and stored as float32, so a
CompVis checkpoint's schedule buffers compare equal to ours.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SCHEDULE_BUFFER_NAMES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def make_beta_schedule(
    schedule: str,
    n_timestep: int,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> np.ndarray:
    """Betas in float64. "linear" is CompVis's scaled-linear: linspace over sqrt(beta), squared."""
    if n_timestep <= 0:
        raise ValueError(f"timesteps must be positive, got {n_timestep}")
    if schedule == "linear":
        # torch.linspace, as the reference: numpy's linspace differs in the last bit
        return (
            torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=torch.float64) ** 2
        ).numpy()
    if schedule == "cosine":
        steps = np.arange(n_timestep + 1, dtype=np.float64) / n_timestep + cosine_s
        alphas = np.cos(steps / (1 + cosine_s) * math.pi / 2) ** 2
        alphas = alphas / alphas[0]
        return np.clip(1 - alphas[1:] / alphas[:-1], 0, 0.999)
    if schedule == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64).numpy()
    if schedule == "sqrt":
        return (torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64) ** 0.5).numpy()
    raise ValueError(
        f"unknown beta_schedule {schedule!r}; expected one of 'linear', 'cosine', 'sqrt_linear', 'sqrt'"
    )


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2024 (Algorithm 1): shift and scale sqrt(alphas_cumprod) so its last value is 0 (the
    last timestep is pure noise, SNR 0, as at sampling time) and its first is unchanged; float64."""
    sqrt_ac = np.sqrt(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))
    first, last = sqrt_ac[0], sqrt_ac[-1]
    sqrt_ac = (sqrt_ac - last) * first / (first - last)
    ac = sqrt_ac**2
    alphas = np.concatenate([ac[:1], ac[1:] / ac[:-1]])
    return 1.0 - alphas


def schedule_buffers(betas: np.ndarray, v_posterior: float = 0.0) -> dict[str, torch.Tensor]:
    """The twelve float32 schedule buffers of a CompVis DDPM, keyed by their state_dict names."""
    betas = np.asarray(betas, dtype=np.float64)
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = (1 - v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (
        1.0 - alphas_cumprod
    ) + v_posterior * betas
    with np.errstate(divide="ignore"):  # a zero-terminal-SNR schedule: 1 / alphas_cumprod[-1] is inf
        return _schedule_values(betas, alphas, alphas_cumprod, alphas_cumprod_prev, posterior_variance)


def _schedule_values(
    betas: np.ndarray,
    alphas: np.ndarray,
    alphas_cumprod: np.ndarray,
    alphas_cumprod_prev: np.ndarray,
    posterior_variance: np.ndarray,
) -> dict[str, torch.Tensor]:
    values = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    }
    return {name: torch.tensor(values[name], dtype=torch.float32) for name in SCHEDULE_BUFFER_NAMES}


def lvlb_weights(buffers: dict[str, torch.Tensor], parameterization: str = "eps") -> torch.Tensor:
    """Per-timestep VLB weights (logged only in the reference); computed in float32 from the buffers."""
    betas = buffers["betas"]
    alphas_cumprod = buffers["alphas_cumprod"]
    if parameterization == "eps":
        weights = betas**2 / (2 * buffers["posterior_variance"] * (1.0 - betas) * (1 - alphas_cumprod))
    elif parameterization == "x0":
        weights = 0.5 * torch.sqrt(alphas_cumprod) / (2.0 * 1 - alphas_cumprod)
    elif parameterization == "v":  # as CompVis's later (SD 2) code: uniform
        weights = torch.ones_like(betas)
    else:
        raise ValueError(f"unknown parameterization {parameterization!r}; expected 'eps', 'x0' or 'v'")
    weights[0] = weights[1]
    return weights


def extract(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[t] reshaped to (B, 1, ..., 1) so it broadcasts over a batch of ndim-D tensors."""
    out = values.to(t.device).gather(-1, t)
    return out.reshape(t.shape[0], *([1] * (ndim - 1)))


def q_sample(
    x_start: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    sqrt_alphas_cumprod: torch.Tensor,
    sqrt_one_minus_alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """Draw x_t ~ q(x_t | x_0): sqrt(a_t) x_0 + sqrt(1 - a_t) noise."""
    return (
        extract(sqrt_alphas_cumprod, t, x_start.ndim).to(x_start.dtype) * x_start
        + extract(sqrt_one_minus_alphas_cumprod, t, x_start.ndim).to(x_start.dtype) * noise
    )


def predict_start_from_noise(
    x_t: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    sqrt_recip_alphas_cumprod: torch.Tensor,
    sqrt_recipm1_alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """Invert q_sample for x_0 given the noise."""
    return (
        extract(sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
        - extract(sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * noise
    )
