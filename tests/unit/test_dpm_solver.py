"""DPM-Solver++(2M) and DDIM against the closed-form probability-flow ODE of Gaussian data.

For x0 ~ N(mu, s^2), the optimal noise predictor is eps(x, t) = sigma_t (x - alpha_t mu) /
(alpha_t^2 s^2 + sigma_t^2), and the ODE keeps z = (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2)
fixed. Both samplers end at t = 0 and are compared through the denoiser there with the exact state.
"""

import pytest
import torch

from segldm.diffusion.ddim import ddim_parameters, ddim_sample, make_ddim_timesteps
from segldm.diffusion.dpm_solver import dpm_solver_pp_2m, dpm_solver_timesteps
from segldm.diffusion.schedule import make_beta_schedule, schedule_buffers

AC = schedule_buffers(make_beta_schedule("linear", 1000, 0.0015, 0.0205))["alphas_cumprod"].double()
MU, S = 0.5, 0.5


def gaussian_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    a, sig = AC[t].view(-1, 1, 1, 1).sqrt(), (1 - AC[t]).view(-1, 1, 1, 1).sqrt()
    return sig * (x - a * MU) / (a**2 * S**2 + sig**2)


def exact_state(z: torch.Tensor, t: int) -> torch.Tensor:
    a, sig = AC[t].sqrt(), (1 - AC[t]).sqrt()
    return a * MU + (a**2 * S**2 + sig**2).sqrt() * z


def denoise(x: torch.Tensor, t: int) -> torch.Tensor:
    return (x - (1 - AC[t]).sqrt() * gaussian_eps(x, torch.full((x.shape[0],), t))) / AC[t].sqrt()


Z = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
TARGET = denoise(exact_state(Z, 0), 0)


def dpm_error(steps: int, spacing: str = "logsnr") -> float:
    out, _ = dpm_solver_pp_2m(gaussian_eps, exact_state(Z, 999), AC, dpm_solver_timesteps(steps, AC, spacing))
    return (out - TARGET).abs().max().item()


def ddim_error(steps: int) -> float:
    timesteps = make_ddim_timesteps("uniform", steps, 1000)
    x, _ = ddim_sample(gaussian_eps, exact_state(Z, int(timesteps[-1])), ddim_parameters(AC, timesteps, 0.0))
    return (denoise(x, 0) - TARGET).abs().max().item()


def test_timesteps():
    assert dpm_solver_timesteps(5, AC, "uniform").tolist() == [999, 749, 500, 250, 0]
    logsnr = dpm_solver_timesteps(20, AC)
    assert logsnr[0] == 999 and logsnr[-1] == 0 and (logsnr[:-1] > logsnr[1:]).all()
    with pytest.raises(ValueError, match="steps"):
        dpm_solver_timesteps(0, AC)
    with pytest.raises(ValueError, match="'cubic'"):
        dpm_solver_timesteps(5, AC, "cubic")


def test_dpm_solver_converges_at_second_order():
    errors = [dpm_error(n) for n in (10, 20, 40, 80)]
    assert errors == sorted(errors, reverse=True)
    assert errors[1] < 0.02 and errors[3] < 2e-3
    assert errors[2] / errors[3] > 2.5  # halving the step: ~4x smaller error (DDIM: ~2x)


def test_dpm_solver_at_20_steps_beats_ddim_at_200():
    assert dpm_error(20) < ddim_error(200) < ddim_error(20)
