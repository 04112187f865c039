"""Zero-terminal-SNR schedules and trailing DDIM timesteps (Lin et al. 2024) against closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException

from segldm.diffusion.ddim import ddim_parameters, ddim_sample, make_ddim_timesteps
from segldm.diffusion.objectives import eps_from_prediction, v_target, x0_from_prediction
from segldm.diffusion.schedule import make_beta_schedule, rescale_zero_terminal_snr, schedule_buffers
from tests.unit.test_ldm import tiny_ldm


def test_rescaled_schedule_ends_in_pure_noise_and_keeps_its_start():
    betas = make_beta_schedule("linear", 1000, 0.0015, 0.0205)
    old = np.sqrt(np.cumprod(1 - betas))
    new_betas = rescale_zero_terminal_snr(betas)
    new = np.sqrt(np.cumprod(1 - new_betas))
    assert new[-1] == 0.0 and new_betas[-1] == 1.0  # SNR(T) = 0 exactly
    assert new[0] == pytest.approx(old[0], rel=1e-12)  # the first step is unchanged
    # sqrt(alphas_cumprod) shifted and scaled: (old - old_T) * old_0 / (old_0 - old_T)
    np.testing.assert_allclose(new, (old - old[-1]) * old[0] / (old[0] - old[-1]), rtol=1e-10, atol=1e-12)
    assert np.all(np.diff(new) < 0) and np.all((new_betas > 0) & (new_betas <= 1))
    buffers = schedule_buffers(new_betas)
    assert float(buffers["alphas_cumprod"][-1]) == 0.0 and torch.isfinite(buffers["posterior_variance"]).all()


def test_trailing_timesteps_start_at_the_last_step():
    assert make_ddim_timesteps("trailing", 50, 1000).tolist() == list(range(19, 1000, 20))
    assert make_ddim_timesteps("trailing", 1000, 1000).tolist() == list(range(1000))
    assert make_ddim_timesteps("trailing", 3, 10).tolist() == [2, 6, 9]  # round(10, 6.67, 3.33) - 1
    with pytest.raises(ValueError, match="DDIM steps"):
        make_ddim_timesteps("trailing", 0, 1000)


@pytest.mark.parametrize("a", [0.0, 0.3, 0.999])
def test_x0_and_eps_from_a_v_prediction_are_finite_at_zero_snr(a):
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    ac = torch.full((2,), a)
    x_t = ac.sqrt().view(-1, 1, 1, 1) * x0 + (1 - ac).sqrt().view(-1, 1, 1, 1) * eps
    v = v_target(x0, eps, ac)
    torch.testing.assert_close(x0_from_prediction("v", v, x_t, ac), x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps_from_prediction("v", v, x_t, ac), eps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x0_from_prediction("x0", x0, x_t, ac), x0)


@pytest.mark.parametrize("parameterization", ["v", "x0"])
def test_ddim_on_a_zero_terminal_schedule_reaches_the_data_an_exact_model_predicts(parameterization):
    """With one data point x* and the exact prediction for it, DDIM (eta 0, trailing steps from
    t = T - 1 where the input is pure noise) estimates x* at every step, the pure-noise one included
    (where x0 from eps would be 0/0)."""
    ac = torch.tensor(
        np.cumprod(1 - rescale_zero_terminal_snr(make_beta_schedule("linear", 1000))), dtype=torch.float32
    )
    target = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))

    def model_fn(x, t):
        a = ac[t].view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * target) / (1 - a).sqrt()
        prediction = v_target(target, eps, ac[t]) if parameterization == "v" else target.expand_as(x)
        return (
            eps_from_prediction(parameterization, prediction, x, ac[t]),
            x0_from_prediction(parameterization, prediction, x, ac[t]),
        )

    params = ddim_parameters(ac, make_ddim_timesteps("trailing", 25, 1000), eta=0.0)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    out, inter = ddim_sample(model_fn, x_T, params)
    # every step's x0 estimate is the data point, the first (t = T - 1, pure noise) included
    for pred_x0 in inter["pred_x0"]:
        torch.testing.assert_close(pred_x0, target.expand_as(pred_x0), rtol=1e-4, atol=1e-4)
    assert torch.isfinite(out).all()


def test_latent_diffusion_trains_and_samples_on_a_zero_terminal_schedule():
    sampler = {
        "name": "ddim",
        "steps": 4,
        "eta": 0.0,
        "guidance_scale": 1.0,
        "ddim_discretization": "trailing",
    }
    model = tiny_ldm(zero_terminal_snr=True, parameterization="v", loss_type="l2", sampler=sampler)
    assert float(model.alphas_cumprod[-1]) == 0.0
    batch = {"image": torch.rand(2, 32, 32, 3) * 2 - 1, "label_map": torch.randint(0, 8, (2, 32, 32))}
    x, c = (
        model.get_input(batch, "image"),
        model.get_learned_conditioning(model.get_input(batch, "segmentation")),
    )
    z = model.get_first_stage_encoding(model.encode_first_stage(x))
    loss, _ = model.p_losses(z, c, torch.tensor([999, 0]))  # the pure-noise step trains (target -x0)
    assert torch.isfinite(loss)
    images = model.generate(batch["label_map"], seeds=[0, 1])
    assert torch.isfinite(images).all()
    with pytest.raises(ValueError, match="only ddim samples"):
        model.check_sampler_settings(20, "dpm_solver++", "eval.steps")
    with pytest.raises(InstantiationException, match="zero_terminal_snr=true with parameterization=eps"):
        tiny_ldm(zero_terminal_snr=True, parameterization="eps")
