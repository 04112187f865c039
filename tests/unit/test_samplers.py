"""The sampler registry: every registered sampler runs behind one interface and is exactly the
function it wraps; unknown names and impossible step counts are refused naming the key."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from segldm.diffusion import samplers
from segldm.diffusion.ddim import ddim_parameters, ddim_sample, make_ddim_timesteps
from segldm.diffusion.dpm_solver import dpm_solver_pp_2m, dpm_solver_timesteps
from segldm.diffusion.samplers import SAMPLERS, Sampler, make_sampler, register
from segldm.diffusion.schedule import make_beta_schedule, schedule_buffers

AC = schedule_buffers(make_beta_schedule("linear", 1000, 0.0015, 0.0205))["alphas_cumprod"]


def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.3 * x + 1e-4 * t.view(-1, 1, 1, 1).to(x.dtype)


def gens(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


X_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))


def test_the_registry_holds_the_three_samplers_by_name() -> None:
    assert set(SAMPLERS) >= {"ddim", "dpm_solver++", "dpm_solver++_sde"}
    assert tuple(SAMPLERS) == samplers.SAMPLER_NAMES
    for name in SAMPLERS:
        assert make_sampler(name, 10, 0.5).name == name


def test_ddim_object_is_the_ddim_function() -> None:
    got, _ = make_sampler("ddim", 20, 1.0).sample(eps, X_T, AC, gens([1, 2, 3]))
    params = ddim_parameters(AC, make_ddim_timesteps("uniform", 20, 1000), 1.0)
    want, _ = ddim_sample(eps, X_T, params, gens([1, 2, 3]))
    assert torch.equal(got, want)


@pytest.mark.parametrize(("name", "eta"), [("dpm_solver++", 0.0), ("dpm_solver++_sde", 1.0)])
def test_dpm_objects_are_the_dpm_function(name: str, eta: float) -> None:
    got, _ = make_sampler(name, 8, 1.0, spacing="uniform").sample(eps, X_T, AC, gens([4, 5, 6]))
    timesteps = dpm_solver_timesteps(8, AC, "uniform")
    want, _ = dpm_solver_pp_2m(eps, X_T, AC, timesteps, False, eta=eta, generators=gens([4, 5, 6]))
    assert torch.equal(got, want)


def test_unknown_names_and_bad_steps_are_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown sampler 'euler'; expected one of \['ddim'"):
        make_sampler("euler", 10, 0.0)
    with pytest.raises(ValueError, match="eval.steps=0 must be positive"):
        make_sampler("dpm_solver++", 0, 0.0).check(1000, "eval.steps")
    with pytest.raises(ValueError, match="eval.steps=36: 36 DDIM steps"):
        make_sampler("ddim", 36, 0.0).check(1000, "eval.steps")
    with pytest.raises(ValueError, match="spacing='cubic'"):
        make_sampler("dpm_solver++", 10, 0.0, spacing="cubic").check(1000, "steps")


def test_a_new_sampler_is_one_registered_class(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(samplers, "SAMPLERS", dict(SAMPLERS))

    @register("x0_only")
    @dataclass(frozen=True)
    class OneStep(Sampler):
        def sample(self, model_fn, x_T, alphas_cumprod, generators=None, progress=False):
            t = torch.full((x_T.shape[0],), len(alphas_cumprod) - 1)
            a = alphas_cumprod[-1]
            return (x_T - (1 - a).sqrt() * model_fn(x_T, t)) / a.sqrt(), []

    out, _ = samplers.make_sampler("x0_only", 1, 0.0).sample(eps, X_T, AC)
    assert out.shape == X_T.shape and "x0_only" in samplers.SAMPLERS
