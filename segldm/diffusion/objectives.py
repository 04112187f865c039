"""What the UNet predicts and how each timestep's loss is weighted, as pure functions of alpha_bar_t.

Parameterizations (x_t = sqrt(a) x0 + sqrt(1 - a) eps, a = alpha_bar_t):

* ``eps``: the noise (DDPM, the seed's recipe);
* ``x0``: the clean latent;
* ``v``: v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022), well-conditioned at both ends.

Every sampler works on eps, so a prediction is turned into eps with :func:`eps_from_prediction`.
Min-SNR weighting (Hang et al. 2023) clamps each timestep's weight at ``gamma`` in SNR terms,
SNR = a / (1 - a): expressed on the loss of each parameterization, min(SNR, gamma) / SNR for eps,
min(SNR, gamma) for x0 and min(SNR, gamma) / (SNR + 1) for v.
"""

from __future__ import annotations

import torch

from segldm.diffusion.samplers import sampler_type, zero_terminal_snr_samplers

PARAMETERIZATIONS = ("eps", "x0", "v")
LOSS_WEIGHTINGS = ("none", "min_snr")


def snr(alphas_cumprod_t: torch.Tensor) -> torch.Tensor:
    return alphas_cumprod_t / (1.0 - alphas_cumprod_t)


def v_target(x0: torch.Tensor, eps: torch.Tensor, alphas_cumprod_t: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod_t.view(-1, *[1] * (x0.ndim - 1))
    return a.sqrt() * eps - (1.0 - a).sqrt() * x0


def training_target(
    parameterization: str, x0: torch.Tensor, eps: torch.Tensor, alphas_cumprod_t: torch.Tensor
) -> torch.Tensor:
    if parameterization == "eps":
        return eps
    if parameterization == "x0":
        return x0
    if parameterization == "v":
        return v_target(x0, eps, alphas_cumprod_t)
    raise ValueError(
        f"unknown parameterization {parameterization!r}; expected one of {list(PARAMETERIZATIONS)}"
    )


def eps_from_prediction(
    parameterization: str, prediction: torch.Tensor, x_t: torch.Tensor, alphas_cumprod_t: torch.Tensor
) -> torch.Tensor:
    """The noise a prediction implies at x_t (identity for eps)."""
    if parameterization == "eps":
        return prediction
    a = alphas_cumprod_t.view(-1, *[1] * (x_t.ndim - 1)).to(x_t.dtype)
    if parameterization == "x0":
        return (x_t - a.sqrt() * prediction) / (1.0 - a).sqrt()
    if parameterization == "v":
        return a.sqrt() * prediction + (1.0 - a).sqrt() * x_t
    raise ValueError(
        f"unknown parameterization {parameterization!r}; expected one of {list(PARAMETERIZATIONS)}"
    )


def x0_from_prediction(
    parameterization: str, prediction: torch.Tensor, x_t: torch.Tensor, alphas_cumprod_t: torch.Tensor
) -> torch.Tensor:
    """The clean sample a prediction implies at x_t, without dividing by sqrt(a) for v and x0 (finite
    at a = 0, the last step of a zero-terminal-SNR schedule); eps divides, as it must."""
    if parameterization == "x0":
        return prediction
    a = alphas_cumprod_t.view(-1, *[1] * (x_t.ndim - 1)).to(x_t.dtype)
    if parameterization == "v":
        return a.sqrt() * x_t - (1.0 - a).sqrt() * prediction
    if parameterization == "eps":
        return (x_t - (1.0 - a).sqrt() * prediction) / a.sqrt()
    raise ValueError(
        f"unknown parameterization {parameterization!r}; expected one of {list(PARAMETERIZATIONS)}"
    )


def zero_terminal_snr_problems(zero_terminal_snr: bool, parameterization: str, sampler: str) -> list[str]:
    """A zero-terminal-SNR schedule needs a model that predicts v or x0 and a sampler that starts at
    t = T - 1 without dividing by the SNR there (``Sampler.supports_zero_terminal_snr``: DDIM). An
    unknown sampler name is the name check's to report."""
    if not zero_terminal_snr:
        return []
    problems = []
    if parameterization == "eps":
        problems.append(
            "model.diffusion.zero_terminal_snr=true with parameterization=eps: at the last timestep the input "
            "is pure noise, so predicting the noise says nothing about the image (Lin et al. 2024); set "
            "model.diffusion.parameterization=v (or x0)"
        )
    sampler_class = sampler_type(sampler)
    if sampler_class is not None and not sampler_class.supports_zero_terminal_snr:
        able = " or ".join(f"model.sampler.name={name}" for name in zero_terminal_snr_samplers())
        problems.append(
            f"model.diffusion.zero_terminal_snr=true with model.sampler.name={sampler}: its log-SNR is -inf at "
            f"the last timestep; use {able} (with model.sampler.ddim_discretization=trailing)"
        )
    return problems


def objective_problems(parameterization: str, weighting: str, gamma: float) -> list[str]:
    """What is wrong with an objective, one sentence per problem naming its model.* key (empty: fine).
    LatentDiffusion's constructor raises them, its start-up check lists them, and
    :func:`check_loss_weighting` asks it for the weighting alone."""
    problems = []
    if parameterization not in PARAMETERIZATIONS:
        problems.append(
            f"model.diffusion.parameterization={parameterization!r} is not supported; use one of {list(PARAMETERIZATIONS)}"
        )
    if weighting not in LOSS_WEIGHTINGS:
        problems.append(
            f"model.diffusion.loss_weighting={weighting!r} is not supported; use one of {list(LOSS_WEIGHTINGS)}"
        )
    elif weighting == "min_snr" and not float(gamma) > 0:
        problems.append(f"model.diffusion.min_snr_gamma={gamma} must be positive (the paper uses 5)")
    return problems


def check_loss_weighting(weighting: str, gamma: float) -> None:
    """ValueError for a weighting this module does not know, or min-SNR with a non-positive gamma."""
    problems = objective_problems(PARAMETERIZATIONS[0], weighting, gamma)
    if problems:
        raise ValueError("; ".join(problems))


def loss_weights(
    weighting: str, parameterization: str, alphas_cumprod_t: torch.Tensor, gamma: float = 5.0
) -> torch.Tensor:
    """Per-sample weights of the simple loss (ones for ``none``)."""
    check_loss_weighting(weighting, gamma)
    if weighting == "none":
        return torch.ones_like(alphas_cumprod_t)
    s = snr(alphas_cumprod_t.double())
    clamped = torch.clamp(s, max=float(gamma))
    weights = {"eps": clamped / s, "x0": clamped, "v": clamped / (s + 1.0)}[parameterization]
    return weights.to(alphas_cumprod_t.dtype)
