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


# ---------------------------------------------------------------------------- SDE-DPM-Solver++(2M)
# The reverse SDE samples the data law, so with the exact Gaussian denoiser the final x0 estimate of
# many independent chains must follow the exact law of that estimate: the denoiser at t = 0 applied
# to the exact marginal x_0 ~ N(a0 mu, a0^2 s^2 + sig0^2), i.e. N(mu, (a0 s^2)^2 / (a0^2 s^2 + sig0^2)).
N_CHAINS = 100_000


def denoised_std(t: int) -> float:
    a, sig = AC[t].sqrt(), (1 - AC[t]).sqrt()
    return (a * S**2 / (a**2 * S**2 + sig**2).sqrt()).item()


def chains(seed: int) -> torch.Tensor:
    z = torch.randn(N_CHAINS, 1, 1, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return exact_state(z, 999)


def sde_law_error(steps: int) -> tuple[float, float]:
    torch.manual_seed(steps)
    out, _ = dpm_solver_pp_2m(gaussian_eps, chains(1), AC, dpm_solver_timesteps(steps, AC), eta=1.0)
    return abs(out.mean().item() - MU), abs(out.std().item() - denoised_std(0))


def test_sde_solver_samples_the_gaussian_law():
    for steps, tolerance in ((25, 0.012), (100, 0.004)):
        mean_error, std_error = sde_law_error(steps)
        assert mean_error < 0.006, (steps, mean_error)
        assert std_error < tolerance, (steps, std_error)


def test_sde_solver_at_25_steps_beats_ddim_eta1_at_200():
    ddim_steps = make_ddim_timesteps("uniform", 200, 1000)
    torch.manual_seed(0)
    _, inter = ddim_sample(gaussian_eps, chains(2), ddim_parameters(AC, ddim_steps, 1.0))
    ddim_std_error = abs(inter["pred_x0"][-1].std().item() - denoised_std(int(ddim_steps[0])))
    assert sde_law_error(25)[1] < ddim_std_error / 2


def test_sde_solver_with_eta_0_is_the_ode_solver_and_uses_one_generator_per_sample():
    steps = dpm_solver_timesteps(20, AC)
    ode, _ = dpm_solver_pp_2m(gaussian_eps, exact_state(Z, 999), AC, steps)
    assert torch.equal(dpm_solver_pp_2m(gaussian_eps, exact_state(Z, 999), AC, steps, eta=0.0)[0], ode)

    def run(seeds: list[int], x: torch.Tensor) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return dpm_solver_pp_2m(gaussian_eps, x, AC, steps, eta=1.0, generators=gens)[0]

    x = exact_state(Z, 999)
    both = run([5, 6, 7, 8], x)
    assert torch.equal(run([7], x[2:3]), both[2:3])  # sample 2 depends on its own generator only
    assert not torch.equal(both, ode)
    with pytest.raises(ValueError, match="eta"):
        dpm_solver_pp_2m(gaussian_eps, x, AC, steps, eta=-1.0)
