"""Parameterizations (eps, x0, v) and min-SNR weighting against their closed forms, and the samplers
consistent with each: a perfect predictor of any parameterization gives the same eps."""

from __future__ import annotations

import pytest
import torch

from segldm.diffusion.objectives import eps_from_prediction, loss_weights, snr, training_target, v_target
from segldm.diffusion.schedule import make_beta_schedule, schedule_buffers
from segldm.runtime.checks import ConfigError, validate_config
from tests.conftest import TINY_DATA, TINY_FIRST_STAGE, TINY_UNET, compose_train
from tests.unit.test_ldm import tiny_ldm

AC = schedule_buffers(make_beta_schedule("linear", 1000, 0.0015, 0.0205))["alphas_cumprod"].double()
GEN = torch.Generator().manual_seed(0)
X0, EPS = (
    torch.randn(5, 3, 4, 4, generator=GEN, dtype=torch.float64),
    torch.randn(5, 3, 4, 4, generator=GEN, dtype=torch.float64),
)
T = torch.tensor([0, 10, 300, 700, 999])


def test_v_is_sqrt_a_eps_minus_sqrt_1_minus_a_x0() -> None:
    a = AC[T].view(-1, 1, 1, 1)
    assert torch.allclose(v_target(X0, EPS, AC[T]), a.sqrt() * EPS - (1 - a).sqrt() * X0)
    # v, x_t -> x0 and eps: x0 = sqrt(a) x_t - sqrt(1-a) v (the identity v-prediction rests on)
    x_t = a.sqrt() * X0 + (1 - a).sqrt() * EPS
    assert torch.allclose(a.sqrt() * x_t - (1 - a).sqrt() * v_target(X0, EPS, AC[T]), X0, atol=1e-12)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_a_perfect_predictor_of_any_parameterization_gives_the_true_eps(parameterization: str) -> None:
    a = AC[T].view(-1, 1, 1, 1)
    x_t = a.sqrt() * X0 + (1 - a).sqrt() * EPS
    prediction = training_target(parameterization, X0, EPS, AC[T])
    eps = eps_from_prediction(parameterization, prediction, x_t, AC[T])
    assert torch.allclose(eps[1:], EPS[1:], atol=1e-8)  # t = 0: 1 - a ~ 1e-3, x0 -> eps amplifies rounding


def test_min_snr_weights_are_the_papers() -> None:
    s = snr(AC[T])
    for gamma in (1.0, 5.0):
        clamped = torch.minimum(s, torch.full_like(s, gamma))
        assert torch.allclose(loss_weights("min_snr", "eps", AC[T], gamma), clamped / s)
        assert torch.allclose(loss_weights("min_snr", "x0", AC[T], gamma), clamped)
        assert torch.allclose(loss_weights("min_snr", "v", AC[T], gamma), clamped / (s + 1))
    assert torch.equal(loss_weights("none", "v", AC[T]), torch.ones_like(AC[T]))
    assert loss_weights("min_snr", "eps", AC[-1:], 5.0).item() == 1.0  # SNR < gamma: unweighted
    with pytest.raises(ValueError, match="min_snr_gamma=0 must be positive"):
        loss_weights("min_snr", "eps", AC[T], 0)
    with pytest.raises(ValueError, match="model.diffusion.loss_weighting='p2' is not supported"):
        loss_weights("p2", "eps", AC[T])


def test_v_model_trains_on_the_v_target_with_min_snr_weights() -> None:
    model = tiny_ldm(parameterization="v", loss_weighting="min_snr", min_snr_gamma=5.0, loss_type="l2").eval()
    z, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 900])
    c = model.get_learned_conditioning(torch.randint(0, 8, (2, 32, 32)))
    noise = torch.randn_like(z)
    _, logs = model.p_losses(z, c, t, noise)
    a = model.alphas_cumprod[t]
    x_t = model.q_sample(z, t, noise)
    out = model.apply_model(x_t, t, c)
    per = ((out - v_target(z, noise, a)) ** 2).mean(dim=[1, 2, 3]) * loss_weights("min_snr", "v", a, 5.0)
    assert torch.allclose(logs["val/loss_simple"], per.mean(), rtol=1e-5)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "model.diffusion.parameterization=score",
            r"model.diffusion.parameterization='score' is not supported",
        ),
        ("model.diffusion.loss_weighting=p2", r"model.diffusion.loss_weighting='p2' is not supported"),
        ("model.diffusion.min_snr_gamma=-1", None),
    ],
)
def test_bad_objectives_stop_at_start_up(override: str, message: str | None) -> None:
    extra = ["model.diffusion.loss_weighting=min_snr"] if "gamma" in override else []
    cfg = compose_train(
        [*TINY_DATA, *TINY_FIRST_STAGE, *TINY_UNET, "paths.output_dir=/tmp/unused", *extra, override]
    )
    with pytest.raises(ConfigError, match=message or r"model.diffusion.min_snr_gamma=-1 must be positive"):
        validate_config(cfg)
