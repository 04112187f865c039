"""The sampler registry: every registered sampler runs behind one interface and is exactly the
function it wraps; unknown names, unknown options and impossible step counts are refused naming the
key; ``model.sampler`` is one typed group with its defaults in one place; what a sampler can do is a
class attribute."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from segldm.diffusion import samplers
from segldm.diffusion.ddim import ddim_parameters, ddim_sample, make_ddim_timesteps
from segldm.diffusion.dpm_solver import dpm_solver_pp_2m, dpm_solver_timesteps
from segldm.diffusion.objectives import zero_terminal_snr_problems
from segldm.diffusion.samplers import (
    SAMPLERS,
    DDIMSampler,
    DPMSolverPP,
    Sampler,
    SamplerSettings,
    make_sampler,
    register,
    sampler_option_keys,
    sampler_type,
    zero_terminal_snr_samplers,
)
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


def test_sampler_settings_hold_the_defaults_and_give_each_sampler_its_options() -> None:
    assert SamplerSettings.from_config(None) == SamplerSettings() == SamplerSettings("ddim", 200, 1.0, 1.0)
    # CompVis-converted configs and old checkpoints hold a subset of the keys: the rest are the defaults
    old = SamplerSettings.from_config({"steps": 50, "eta": 1.0})
    assert (old.name, old.steps, old.eta, old.guidance_scale, dict(old.options)) == ("ddim", 50, 1.0, 1.0, {})
    shared = SamplerSettings.from_config({"spacing": "uniform", "ddim_discretization": "trailing"})
    assert shared.build() == DDIMSampler(steps=200, eta=1.0, ddim_discretization="trailing")
    assert shared.override(name="dpm_solver++", steps=8).build() == DPMSolverPP(8, 1.0, "uniform")
    assert shared.override(steps=None, eta=0.0).steps == 200
    assert SamplerSettings.from_config(shared.as_config()) == shared


def test_unknown_sampler_options_are_refused_naming_the_known_ones() -> None:
    with pytest.raises(
        ValueError,
        match=r"model.sampler.spacng='logsnr' is not an option of dpm_solver\+\+ or any other sampler; "
        r"model.sampler holds name, steps, eta, guidance_scale and the samplers' options: "
        r"ddim_discretization \(ddim\); spacing \(dpm_solver\+\+, dpm_solver\+\+_sde\)",
    ):
        SamplerSettings.from_config({"name": "dpm_solver++", "spacng": "logsnr"})
    with pytest.raises(ValueError, match=r"eval.sampler.a=1, eval.sampler.b=2 are not options of ddim"):
        SamplerSettings.from_config({"a": 1, "b": 2}, "eval.sampler")
    with pytest.raises(ValueError, match=r"model.sampler.steps='many' must be int"):
        SamplerSettings.from_config({"steps": "many"})
    with pytest.raises(ValueError, match=r"sampler ddim: \['spacng'\] are no sampler's options"):
        make_sampler("ddim", 10, 0.0, spacng="uniform")


def test_capabilities_are_class_attributes_not_name_comparisons() -> None:
    assert zero_terminal_snr_samplers() == ["ddim"]
    assert DDIMSampler.supports_zero_terminal_snr and not DPMSolverPP.supports_zero_terminal_snr
    assert not SAMPLERS["dpm_solver++_sde"].supports_zero_terminal_snr
    diffusers_type = sampler_type("diffusers:UniPCMultistepScheduler")
    assert diffusers_type is not None and not diffusers_type.supports_zero_terminal_snr
    assert sampler_type("plms") is None
    assert zero_terminal_snr_problems(True, "v", "ddim") == []
    (problem,) = zero_terminal_snr_problems(True, "v", "dpm_solver++")
    assert "model.sampler.name=dpm_solver++" in problem and "use model.sampler.name=ddim" in problem


def test_a_new_samplers_options_and_capabilities_come_from_its_class(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(samplers, "SAMPLERS", dict(SAMPLERS))

    @register("x0_only")
    @dataclass(frozen=True)
    class OneStep(Sampler):
        order: int = 1
        supports_zero_terminal_snr = True

    assert sampler_option_keys()["order"] == ["x0_only"]
    settings = SamplerSettings.from_config({"name": "x0_only", "order": 2, "spacing": "uniform"})
    assert settings.build() == OneStep(steps=200, eta=1.0, order=2)
    assert "x0_only" in zero_terminal_snr_samplers()
    assert zero_terminal_snr_problems(True, "v", "x0_only") == []
