"""Samplers as objects behind one interface, found by name in one registry.

A sampler takes the noise predictor ``model_fn(x, t) -> eps``, the initial noise ``x_T`` and the
schedule's ``alphas_cumprod``, and returns ``(x_0, intermediates)``. With ``generators`` (one per
sample) every random draw of sample i comes from generator i, so an image does not depend on its
batch. Adding a sampler is one class here with ``@register("name")``: the LightningModule,
``segldm.sample``, ``segldm.eval`` and the start-up checks find it by name. Names starting with
``diffusers:`` are diffusers' schedulers (``diffusers:UniPCMultistepScheduler``, options in the name:
segldm.diffusion.diffusers_samplers, which needs ``pip install 'segldm[diffusers]'``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from segldm.diffusion.ddim import (
    DDIM_DISCRETIZATIONS,
    check_ddim_steps,
    ddim_parameters,
    ddim_sample,
    make_ddim_timesteps,
)
from segldm.diffusion.dpm_solver import TIMESTEP_SPACINGS, dpm_solver_pp_2m, dpm_solver_timesteps

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SAMPLERS: dict[str, type[Sampler]] = {}
DIFFUSERS_PREFIX = "diffusers:"  # diffusers:<SchedulerClass>(options): segldm.diffusion.diffusers_samplers


def register(name: str) -> Callable[[type[Sampler]], type[Sampler]]:
    def add(cls: type[Sampler]) -> type[Sampler]:
        SAMPLERS[name] = cls
        cls.name = name
        return cls

    return add


@dataclass(frozen=True)
class Sampler:
    """``steps`` UNet-step budget and noise scale ``eta``; subclasses implement :meth:`sample`."""

    steps: int
    eta: float = 0.0
    name: ClassVar[str] = ""

    def check(self, num_timesteps: int, steps_key: str) -> None:
        """Raise ValueError naming ``steps_key`` when this sampler cannot run ``steps`` here."""
        if int(self.steps) <= 0:
            raise ValueError(f"{steps_key}={self.steps} must be positive")

    def sample(
        self,
        model_fn: ModelFn,
        x_T: torch.Tensor,
        alphas_cumprod: torch.Tensor,
        generators: Sequence[torch.Generator] | None = None,
        progress: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        raise NotImplementedError


@register("ddim")
@dataclass(frozen=True)
class DDIMSampler(Sampler):
    """DDIM (eta 0: deterministic, 1: DDPM-like noise) over CompVis's "uniform" timesteps, or the
    "trailing" ones that start at t = T - 1 (zero-terminal-SNR schedules)."""

    ddim_discretization: str = "uniform"

    def check(self, num_timesteps: int, steps_key: str) -> None:
        super().check(num_timesteps, steps_key)
        if self.ddim_discretization not in DDIM_DISCRETIZATIONS:
            raise ValueError(
                f"model.sampler.ddim_discretization={self.ddim_discretization!r}: use one of "
                f"{list(DDIM_DISCRETIZATIONS)}"
            )
        check_ddim_steps(int(self.steps), num_timesteps, steps_key, self.ddim_discretization)

    def sample(self, model_fn, x_T, alphas_cumprod, generators=None, progress=False):
        timesteps = make_ddim_timesteps(self.ddim_discretization, int(self.steps), len(alphas_cumprod))
        params = ddim_parameters(alphas_cumprod, timesteps, float(self.eta))
        return ddim_sample(model_fn, x_T, params, generators, progress)


@register("dpm_solver++")
@dataclass(frozen=True)
class DPMSolverPP(Sampler):
    """DPM-Solver++(2M), deterministic (eta is not used); timesteps spaced in logSNR by default."""

    spacing: str = "logsnr"
    stochastic: ClassVar[bool] = False

    def check(self, num_timesteps: int, steps_key: str) -> None:
        super().check(num_timesteps, steps_key)
        if self.spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"model.sampler.spacing={self.spacing!r}: use one of {list(TIMESTEP_SPACINGS)}")

    def sample(self, model_fn, x_T, alphas_cumprod, generators=None, progress=False):
        timesteps = dpm_solver_timesteps(int(self.steps), alphas_cumprod, self.spacing)
        eta = float(self.eta) if self.stochastic else 0.0
        return dpm_solver_pp_2m(
            model_fn, x_T, alphas_cumprod, timesteps, progress, eta=eta, generators=generators
        )


@register("dpm_solver++_sde")
@dataclass(frozen=True)
class DPMSolverPPSDE(DPMSolverPP):
    """DPM-Solver++(2M) SDE form with noise scale eta (1: the reverse SDE)."""

    stochastic: ClassVar[bool] = True


SAMPLER_NAMES = tuple(SAMPLERS)


@dataclass(frozen=True)
class SamplerFamily:
    """Samplers named by a prefix (``diffusers:<SchedulerClass>``): how to build one and why a name is
    not one. Registered by the module that implements them (imported by ``segldm.diffusion``)."""

    build: Callable[..., Sampler]
    problem: Callable[[str], str | None]


FAMILIES: dict[str, SamplerFamily] = {}


def register_family(prefix: str, family: SamplerFamily) -> None:
    FAMILIES[prefix] = family


def make_sampler(name: str, steps: int, eta: float, **options: Any) -> Sampler:
    """The registered sampler ``name``, or a ``diffusers:`` one (ValueError listing the names when unknown).

    ``options`` are the settings of any sampler (``spacing``, ``ddim_discretization``, the model's
    ``schedule``, a ``diffusers:`` sampler's ``options``); each sampler takes those it has.
    """
    if name.startswith(DIFFUSERS_PREFIX):
        return FAMILIES[DIFFUSERS_PREFIX].build(name, steps, eta, **options)
    if name not in SAMPLERS:
        raise ValueError(
            f"unknown sampler {name!r}; expected one of {list(SAMPLERS)} or {DIFFUSERS_PREFIX}<SchedulerClass>"
        )
    cls = SAMPLERS[name]
    known = {k: v for k, v in options.items() if k in cls.__dataclass_fields__}
    return cls(steps=int(steps), eta=float(eta), **known)


def sampler_name_problem(name: str) -> str | None:
    """Why ``name`` is not a sampler (for start-up checks, before a model exists), or None."""
    if name.startswith(DIFFUSERS_PREFIX):
        return FAMILIES[DIFFUSERS_PREFIX].problem(name)
    if name not in SAMPLERS:
        return f"is not a sampler; use one of {list(SAMPLERS)} or {DIFFUSERS_PREFIX}<SchedulerClass> (docs/diffusers.md)"
    return None
