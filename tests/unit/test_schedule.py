"""Beta schedule, schedule buffers and q_sample against closed forms and the CompVis fixture."""

import numpy as np
import pytest
import torch

from segldm.diffusion.schedule import (
    SCHEDULE_BUFFER_NAMES,
    lvlb_weights,
    make_beta_schedule,
    predict_start_from_noise,
    q_sample,
    schedule_buffers,
)
from tests.compvis_fixtures import load_io, model_fixture_dirs


def test_linear_schedule_is_scaled_linear_closed_form():
    betas = make_beta_schedule("linear", 1000, 0.0015, 0.0205)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(0.0015, rel=1e-12)
    assert betas[-1] == pytest.approx(0.0205, rel=1e-12)
    # sqrt(beta) is linear in t
    root = np.sqrt(betas)
    assert np.allclose(np.diff(root), (np.sqrt(0.0205) - np.sqrt(0.0015)) / 999, atol=1e-15)


def test_buffers_closed_forms():
    betas = make_beta_schedule("linear", 1000, 0.0015, 0.0205)
    buf = schedule_buffers(betas)
    assert set(buf) == set(SCHEDULE_BUFFER_NAMES)
    ac = np.cumprod(1 - betas)
    assert torch.allclose(buf["alphas_cumprod"], torch.tensor(ac, dtype=torch.float32))
    assert torch.all(buf["alphas_cumprod"][1:] < buf["alphas_cumprod"][:-1])  # strictly decreasing
    assert buf["alphas_cumprod_prev"][0] == 1.0
    assert torch.allclose(
        buf["sqrt_alphas_cumprod"] ** 2 + buf["sqrt_one_minus_alphas_cumprod"] ** 2,
        torch.ones(1000),
        atol=1e-6,
    )
    assert buf["posterior_variance"][0] == 0.0
    assert all(b.dtype == torch.float32 for b in buf.values())


def test_q_sample_moments_and_inverse():
    buf = schedule_buffers(make_beta_schedule("linear", 1000, 0.0015, 0.0205))
    torch.manual_seed(0)
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    t = torch.full((20000,), 500, dtype=torch.long)
    noise = torch.randn_like(x0)
    xt = q_sample(x0, t, noise, buf["sqrt_alphas_cumprod"], buf["sqrt_one_minus_alphas_cumprod"])
    a = buf["alphas_cumprod"][500].item()
    assert xt.mean().item() == pytest.approx(0.7 * a**0.5, abs=0.02)
    assert xt.var().item() == pytest.approx(1 - a, rel=0.05)
    back = predict_start_from_noise(
        xt, t, noise, buf["sqrt_recip_alphas_cumprod"], buf["sqrt_recipm1_alphas_cumprod"]
    )
    assert torch.allclose(back, x0, atol=1e-4)


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="'bogus'"):
        make_beta_schedule("bogus", 10)


@pytest.mark.parametrize("folder", model_fixture_dirs(), ids=lambda p: p.name)
def test_matches_reference_buffers(folder):
    io = load_io(folder)
    state = torch.load(folder / "model.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    betas = make_beta_schedule("linear", 1000, 0.0015, 0.0205)
    assert np.array_equal(betas, io["betas_float64"].numpy())
    buf = schedule_buffers(betas)
    for name in SCHEDULE_BUFFER_NAMES:
        assert torch.equal(buf[name], state[name]), name
    assert torch.allclose(lvlb_weights(buf), io["lvlb_weights"], rtol=1e-6)
    xn = q_sample(
        io["z"], io["t"], io["noise"], buf["sqrt_alphas_cumprod"], buf["sqrt_one_minus_alphas_cumprod"]
    )
    assert torch.allclose(xn, io["x_noisy"], atol=1e-6)
