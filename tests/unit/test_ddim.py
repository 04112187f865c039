"""DDIM: CompVis timesteps, coefficients, determinism at eta=0, closed-form single steps."""

import numpy as np
import pytest
import torch

from segldm.diffusion.ddim import (
    check_ddim_steps,
    ddim_parameters,
    ddim_sample,
    ddim_step,
    ddim_steps_valid,
    make_ddim_timesteps,
    nearest_valid_ddim_steps,
)
from segldm.diffusion.schedule import make_beta_schedule, schedule_buffers
from tests.compvis_fixtures import load_io, model_fixture_dirs

AC = schedule_buffers(make_beta_schedule("linear", 1000, 0.0015, 0.0205))["alphas_cumprod"]


def test_uniform_timesteps_shifted_by_one():
    assert make_ddim_timesteps("uniform", 10, 1000).tolist() == list(range(1, 1000, 100))
    assert len(make_ddim_timesteps("uniform", 7, 1000)) == 8  # 1000 // 7 = 142 -> 8 steps, as CompVis


def test_step_counts_that_crash_the_reference_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="out of range"):
        make_ddim_timesteps("uniform", 3, 1000)


def test_valid_step_counts_follow_the_closed_form_and_suggestions_are_the_nearest_valid():
    """uniform: t = k * (T // S) + 1 for k < ceil(T / stride); valid iff the last t < T."""
    T = 1000
    closed = {S for S in range(1, T + 1) if (-(-T // (T // S)) - 1) * (T // S) + 1 < T}
    assert {S for S in range(1, T + 1) if ddim_steps_valid(S, T)} == closed
    for S in (3, 9, 27, 36, 37, *range(101, 112), *range(251, 334)):  # the reference's IndexError cases
        assert not ddim_steps_valid(S, T)
        below, above = nearest_valid_ddim_steps(S, T)
        assert below in closed and not any(below < n < S for n in closed)
        assert above in closed and not any(S < n < above for n in closed)
    assert nearest_valid_ddim_steps(36, T) == (35, 38)
    with pytest.raises(ValueError, match=r"eval.steps=36: .* 35 or 38"):
        check_ddim_steps(36, T, "eval.steps")


def test_eta_zero_has_no_noise_and_is_deterministic():
    params = ddim_parameters(AC, make_ddim_timesteps("uniform", 10, 1000), eta=0.0)
    assert torch.all(params.sigmas == 0)
    model = lambda x, t: 0.1 * x + t.float().view(-1, 1, 1, 1) / 1000  # noqa: E731
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    a, _ = ddim_sample(model, x_T, params)
    b, _ = ddim_sample(model, x_T, params)
    assert torch.equal(a, b)


def test_single_step_closed_form():
    x, eps = torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2)
    a_t, a_prev = 0.5, 0.8
    x_prev, pred_x0 = ddim_step(x, eps, a_t, a_prev, 0.0, (1 - a_t) ** 0.5, torch.zeros_like(x))
    expected_x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    assert torch.allclose(pred_x0, expected_x0, atol=1e-6)
    assert torch.allclose(x_prev, a_prev**0.5 * expected_x0 + (1 - a_prev) ** 0.5 * eps, atol=1e-6)


def test_per_sample_generators_make_samples_batch_independent():
    params = ddim_parameters(AC, make_ddim_timesteps("uniform", 5, 1000), eta=1.0)
    model = lambda x, t: 0.5 * x  # noqa: E731
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    x_T = torch.zeros(3, 1, 2, 2)
    both, _ = ddim_sample(model, x_T, params, gens([7, 8, 9]))
    alone, _ = ddim_sample(model, x_T[1:2], params, gens([8]))
    assert torch.allclose(both[1:2], alone)


@pytest.mark.parametrize("folder", model_fixture_dirs(), ids=lambda p: p.name)
def test_matches_reference_schedule(folder):
    io = load_io(folder)
    for key, ref in io.items():
        if key.startswith("ddim_timesteps/S"):
            steps = int(key.removeprefix("ddim_timesteps/S"))
            if ref[-1] >= 1000:  # the reference would crash sampling with it; we refuse up front
                with pytest.raises(ValueError):
                    make_ddim_timesteps("uniform", steps, 1000)
            else:
                assert np.array_equal(make_ddim_timesteps("uniform", steps, 1000), ref.numpy()), key
    steps = make_ddim_timesteps("uniform", len(io["ddim/timesteps"]), 1000)
    params = ddim_parameters(AC, steps, eta=0.0)
    assert torch.equal(params.timesteps, io["ddim/timesteps"])
    assert torch.equal(params.alphas, io["ddim/alphas"])
    assert torch.allclose(params.alphas_prev, io["ddim/alphas_prev"], rtol=0, atol=1e-12)
    assert torch.allclose(params.sigmas, io["ddim/sigmas"])
    eta1 = ddim_parameters(AC, steps, eta=1.0)
    assert torch.allclose(eta1.sigmas, io["ddim/sigmas_eta1"], rtol=1e-6)
