"""Samplers as objects behind one interface, found by name in one registry.

A sampler takes the noise predictor ``model_fn(x, t) -> eps``, the initial noise ``x_T`` and the
schedule's ``alphas_cumprod``, and returns ``(x_0, intermediates)``. With ``generators`` (one per
sample) every random draw of sample i comes from generator i, so an image does not depend on its
batch. Adding a sampler is one class here with ``@register("name")``: the LightningModule,
``segldm.sample``, ``segldm.eval`` and the start-up checks find it by name, its dataclass fields
beyond ``steps`` and ``eta`` are ``model.sampler`` keys, and what it can do (sample a zero-terminal-SNR
schedule) is a class attribute, not a name the callers compare with. Names starting with
``diffusers:`` are diffusers' schedulers (``diffusers:UniPCMultistepScheduler``, options in the name:
segldm.diffusion.diffusers_samplers, which needs ``pip install 'segldm[diffusers]'``).

``model.sampler`` itself is :class:`SamplerSettings`: the defaults (DDIM, 200 steps, eta 1, no
guidance) are spelled there and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
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
    # log-SNR is -inf at a zero-terminal-SNR schedule's last timestep: only a sampler that never divides
    # by the SNR there (and takes x0 from a v or x0 prediction) can start from it
    supports_zero_terminal_snr: ClassVar[bool] = False

    @classmethod
    def option_keys(cls) -> tuple[str, ...]:
        """This sampler's own settings (``model.sampler.<key>``): its dataclass fields after steps and eta."""
        return tuple(f.name for f in fields(cls) if f.init and f.name not in ("steps", "eta"))

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
    supports_zero_terminal_snr: ClassVar[bool] = (
        True  # x0 comes from the model at a = 0 (segldm.training.sampling)
    )

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
    sampler_type: type[Sampler]  # the class its samplers are (their capabilities)
    settings: tuple[str, ...] = ()  # keyword settings ``build`` takes besides the model's ``schedule``


FAMILIES: dict[str, SamplerFamily] = {}


def register_family(prefix: str, family: SamplerFamily) -> None:
    FAMILIES[prefix] = family


def sampler_option_keys() -> dict[str, list[str]]:
    """Each ``model.sampler`` key of a registered sampler's own (spacing, ddim_discretization, ...) ->
    the samplers that take it. ``diffusers:`` samplers take theirs in the name."""
    keys: dict[str, list[str]] = {}
    for name, cls in SAMPLERS.items():
        for key in cls.option_keys():
            keys.setdefault(key, []).append(name)
    return keys


def make_sampler(name: str, steps: int, eta: float, *, schedule: Any = None, **options: Any) -> Sampler:
    """The registered sampler ``name``, or a ``diffusers:`` one (ValueError listing the names when unknown).

    ``options`` are ``model.sampler``'s settings of any sampler (``spacing``, ``ddim_discretization``):
    each sampler takes those it has, and a key no sampler has is refused. ``schedule`` (the model's
    ``model.diffusion``) and a family's own settings (a ``diffusers:`` sampler's ``options``) go to
    family samplers.
    """
    known = set(sampler_option_keys()) | {k for family in FAMILIES.values() for k in family.settings}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"sampler {name}: {unknown} are no sampler's options; the samplers' options are {sorted(known)}"
        )
    if name.startswith(DIFFUSERS_PREFIX):
        return FAMILIES[DIFFUSERS_PREFIX].build(name, steps, eta, schedule=schedule, **options)
    if name not in SAMPLERS:
        raise ValueError(
            f"unknown sampler {name!r}; expected one of {list(SAMPLERS)} or {DIFFUSERS_PREFIX}<SchedulerClass>"
        )
    cls = SAMPLERS[name]
    own = {k: v for k, v in options.items() if k in cls.option_keys()}  # the others are other samplers'
    return cls(steps=int(steps), eta=float(eta), **own)


def sampler_type(name: str) -> type[Sampler] | None:
    """The class of the sampler ``name`` (its capabilities), or None when there is no such sampler."""
    if name.startswith(DIFFUSERS_PREFIX) and DIFFUSERS_PREFIX in FAMILIES:
        return FAMILIES[DIFFUSERS_PREFIX].sampler_type
    return SAMPLERS.get(name)


def zero_terminal_snr_samplers() -> list[str]:
    """The registered samplers that sample a zero-terminal-SNR schedule."""
    return [name for name, cls in SAMPLERS.items() if cls.supports_zero_terminal_snr]


SETTING_TYPES: dict[str, type] = {"name": str, "steps": int, "eta": float, "guidance_scale": float}


@dataclass(frozen=True)
class SamplerSettings:
    """``model.sampler``: the sampler that sample grids, ``segldm.sample`` and ``segldm.eval`` use unless
    they override it, with its step budget, noise scale and classifier-free guidance, and the samplers'
    own settings (``options``: ``spacing``, ``ddim_discretization``; each sampler takes those it has,
    so a checkpoint's settings serve whichever sampler eval picks). The defaults are CompVis's
    ``log_images`` inference (DDIM, 200 steps, eta 1), spelled here only."""

    name: str = "ddim"
    steps: int = 200
    eta: float = 1.0
    guidance_scale: float = 1.0
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @classmethod
    def from_config(
        cls, values: Mapping[str, Any] | SamplerSettings | None, key: str = "model.sampler"
    ) -> SamplerSettings:
        """The flat ``model.sampler`` mapping (missing keys: the defaults) as settings; ValueError naming
        ``key`` for a key that is neither a setting nor an option of a registered sampler."""
        if isinstance(values, cls):
            return values
        values = dict(values or {})
        problem = unknown_sampler_key_problem(values, key)
        if problem:
            raise ValueError(problem)
        common: dict[str, Any] = {}
        for name, kind in SETTING_TYPES.items():
            if name in values:
                value = values.pop(name)
                try:
                    common[name] = kind(value)
                except (TypeError, ValueError):
                    raise ValueError(f"{key}.{name}={value!r} must be {kind.__name__}") from None
        return cls(**common, options=values)

    def as_config(self) -> dict[str, Any]:
        """The flat ``model.sampler`` mapping these settings are (eval cards, exports)."""
        return {
            "name": self.name,
            "steps": self.steps,
            "eta": self.eta,
            "guidance_scale": self.guidance_scale,
            **self.options,
        }

    def override(
        self,
        name: str | None = None,
        steps: int | None = None,
        eta: float | None = None,
        guidance_scale: float | None = None,
    ) -> SamplerSettings:
        """These settings with each value that is not None replaced (``eval.*``, ``segldm.sample``'s keys)."""
        given = {"name": name, "steps": steps, "eta": eta, "guidance_scale": guidance_scale}
        return replace(self, **{k: SETTING_TYPES[k](v) for k, v in given.items() if v is not None})

    def build(self, schedule: Any = None) -> Sampler:
        """The sampler these settings name (``schedule``: the model's ``model.diffusion``, for diffusers:)."""
        return make_sampler(self.name, self.steps, self.eta, schedule=schedule, **self.options)


def unknown_sampler_key_problem(values: Mapping[str, Any], key: str = "model.sampler") -> str | None:
    """The keys of ``values`` that are no setting and no registered sampler's option, named with the
    settings and each option's samplers (None: all known). Checked at start-up and by the model."""
    options = sampler_option_keys()
    unknown = sorted(k for k in values if k not in SETTING_TYPES and k not in options)
    if not unknown:
        return None
    name = values.get("name", SamplerSettings.name)
    given = ", ".join(f"{key}.{k}={values[k]!r}" for k in unknown)
    verb = "is not an option" if len(unknown) == 1 else "are not options"
    taken = "; ".join(f"{k} ({', '.join(names)})" for k, names in options.items())
    return (
        f"{given} {verb} of {name} or any other sampler; {key} holds {', '.join(SETTING_TYPES)} and the "
        f"samplers' options: {taken}"
    )


def sampler_name_problem(name: str) -> str | None:
    """Why ``name`` is not a sampler (for start-up checks, before a model exists), or None."""
    if name.startswith(DIFFUSERS_PREFIX):
        return FAMILIES[DIFFUSERS_PREFIX].problem(name)
    if name not in SAMPLERS:
        return f"is not a sampler; use one of {list(SAMPLERS)} or {DIFFUSERS_PREFIX}<SchedulerClass> (docs/diffusers.md)"
    return None
