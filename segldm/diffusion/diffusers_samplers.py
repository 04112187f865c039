"""Samplers people know, from diffusers: ``diffusers:<SchedulerClass>`` in the sampler registry.

``model.sampler.name``, ``eval.sampler``, ``callbacks.generation_metrics.sampler`` and
``SamplingSettings.sampler`` take ``diffusers:UniPCMultistepScheduler``, or a scheduler with its
options, written as a call: ``diffusers:DPMSolverMultistepScheduler(algorithm_type=sde-dpmsolver++,
use_karras_sigmas=true)``. The options travel in the name so that every place that picks a sampler
picks its options too, and the eval card records both. Values are typed by the scheduler's own
constructor defaults (``true``/``false`` for a switch, a number, text); an unknown key, a value of
the wrong type, or a key that would change the model's training schedule is refused, naming the
keys there are.

The scheduler is built as a diffusers user swaps a pipeline's scheduler (``X.from_config(
pipe.scheduler.config)``) on segldm's exported ``DDIMScheduler`` config
(:mod:`segldm.diffusion.diffusers_schedule`: the model's betas, CompVis's ``leading`` timesteps with
``steps_offset=1``, ``set_alpha_to_one=False``), then the options. What segldm keeps:

* guidance: ``model_fn`` already returns the guided noise prediction;
* the prediction: ``model_fn`` returns eps for eps, v and x0 models alike, so the scheduler's
  ``prediction_type`` is ``epsilon``;
* per-sample seeds: ``scheduler.step(..., generator=[one per sample])`` draws row i of the noise
  from generator i (diffusers' ``randn_tensor``), so an image does not depend on its batch;
* ``eta`` goes to the step of schedulers that take one (``DDIMScheduler``); others ignore it.

Checked before sampling: diffusers is installed, the class is a discrete-time scheduler of the DDPM
family whose noise follows the per-sample generators, the options, the step count, integer
timesteps (segldm's models take integer t), and that the scheduler's ``alphas_cumprod`` is the
model's.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from segldm.diffusion.diffusers_schedule import SCHEDULE_KEYS, ddim_scheduler_config
from segldm.diffusion.samplers import (
    DIFFUSERS_PREFIX,
    ModelFn,
    Sampler,
    SamplerFamily,
    register_family,
    zero_terminal_snr_samplers,
)
from segldm.diffusion.schedule import make_beta_schedule, rescale_zero_terminal_snr

INSTALL_HELP = (
    "the diffusers samplers need diffusers: pip install 'segldm[diffusers]' (or pip install diffusers)"
)
SCHEDULE_TOLERANCE = 1e-5  # relative, alphas_cumprod: diffusers' float32 product vs segldm's (measured 6e-7)
# DDIMScheduler's compatible classes that cannot serve here, and why
UNSUPPORTED = {
    "EDMEulerScheduler": "it samples the EDM sigma schedule (sigma_min, sigma_max, rho), not the model's betas",
    "DPMSolverSDEScheduler": "its noise comes from a torchsde Brownian tree with its own seed, not from the "
    "per-sample generators (use DPMSolverMultistepScheduler(algorithm_type=sde-dpmsolver++))",
    "KDPM2DiscreteScheduler": "it evaluates the model at interpolated (non-integer) timesteps",
    "KDPM2AncestralDiscreteScheduler": "it evaluates the model at interpolated (non-integer) timesteps",
}
# options that turn a scheduler into a flow-matching one: segldm's models are discrete-time diffusion
FLOW_KEYS = ("use_flow_sigmas", "flow_shift", "use_dynamic_shifting", "time_shift_type", "shift_terminal")
OBJECT_KEYS = ("solver_p",)  # options that take a Python object, not a value a config can hold
NAME_PATTERN = re.compile(r"^(?P<cls>[A-Za-z_][A-Za-z0-9_]*)(?:\((?P<options>.*)\))?$", re.DOTALL)
Scalar = bool | int | float | str | None


def require_diffusers() -> Any:
    """The diffusers module, or a ModuleNotFoundError naming the install that brings it."""
    try:
        import diffusers
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(INSTALL_HELP) from err
    return diffusers


def supported_schedulers() -> list[str]:
    """The diffusers scheduler classes this adapter runs: DDIMScheduler's compatible classes (the
    discrete-time schedulers of the DDPM family) less :data:`UNSUPPORTED`."""
    diffusers = require_diffusers()
    return sorted(c.__name__ for c in diffusers.DDIMScheduler().compatibles if c.__name__ not in UNSUPPORTED)


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class ``name``; ValueError listing the supported ones otherwise."""
    supported = supported_schedulers()
    if name in supported:
        return getattr(require_diffusers(), name)
    why = f": {UNSUPPORTED[name]}" if name in UNSUPPORTED else " here"
    raise ValueError(
        f"sampler {DIFFUSERS_PREFIX}{name}: {name} is not a diffusers scheduler segldm can sample with{why}; "
        f"use one of {[DIFFUSERS_PREFIX + n for n in supported]}"
    )


def parse_value(text: str) -> Scalar:
    """An option's text as the value it spells: true/false, null/none, an int, a float, else the text."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "none"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def format_value(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def parse_sampler_name(name: str) -> tuple[str, dict[str, Scalar]]:
    """``diffusers:Class(key=value, ...)`` -> (``Class``, {key: value}); ValueError showing the form."""
    if not name.startswith(DIFFUSERS_PREFIX):
        raise ValueError(f"{name!r} is not a diffusers sampler name (they start with {DIFFUSERS_PREFIX!r})")
    example = f"e.g. {DIFFUSERS_PREFIX}DPMSolverMultistepScheduler(algorithm_type=sde-dpmsolver++,use_karras_sigmas=true)"
    match = NAME_PATTERN.match(name[len(DIFFUSERS_PREFIX) :].strip())
    if match is None:
        raise ValueError(
            f"sampler {name!r}: write {DIFFUSERS_PREFIX}<SchedulerClass> or with options, {example}"
        )
    options: dict[str, Scalar] = {}
    for item in filter(None, (part.strip() for part in (match["options"] or "").split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"sampler {name!r}: option {item!r} is not key=value; {example}")
        if key in options:
            raise ValueError(f"sampler {name!r}: option {key} is given twice")
        options[key] = parse_value(value)
    return match["cls"], options


def option_problems(cls: type, options: Mapping[str, Any]) -> list[str]:
    """What is wrong with ``options`` for scheduler ``cls`` (unknown keys, wrong types, schedule keys)."""
    parameters = {
        k: p
        for k, p in inspect.signature(cls.__init__).parameters.items()
        if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    known = sorted(k for k in parameters if k not in (*SCHEDULE_KEYS, *FLOW_KEYS, *OBJECT_KEYS))
    problems = []
    for key, value in options.items():
        if key in SCHEDULE_KEYS:
            problems.append(
                f"{key} is the model's training schedule (taken from model.diffusion); a sampler cannot change it"
            )
        elif key in FLOW_KEYS:
            problems.append(f"{key} is for flow-matching models; segldm's models are discrete-time diffusion")
        elif key not in parameters or key in OBJECT_KEYS:
            problems.append(f"{cls.__name__} has no option {key!r}; its options are {known}")
        else:
            expected = expected_type(parameters[key].default)
            if expected is not None and not accepts(expected, value):
                problems.append(
                    f"{key}={format_value(value)!s} must be {expected.__name__} (its default is "
                    f"{format_value(parameters[key].default)})"
                )
            elif expected is None and not isinstance(value, Scalar):
                problems.append(f"{key}: only plain values (switch, number, text) are options here")
    return problems


def expected_type(default: Any) -> type | None:
    """The type an option's value must have, from the constructor's default (None: any plain value)."""
    for kind in (bool, int, float, str):
        if isinstance(default, kind):
            return kind
    return None


def accepts(expected: type, value: Any) -> bool:
    if expected is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def typed_options(cls: type, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` checked against ``cls`` (ValueError listing every problem), floats as floats."""
    problems = option_problems(cls, options)
    if problems:
        raise ValueError("; ".join(problems))
    parameters = inspect.signature(cls.__init__).parameters
    return {
        k: float(v) if isinstance(parameters[k].default, float) and not isinstance(v, bool) else v
        for k, v in options.items()
    }


def sampler_name_problem(name: str) -> str | None:
    """Why ``diffusers:...`` cannot be a sampler here (a bad form, no diffusers, an unsupported class,
    bad options), or None. For start-up checks: it does not need the model."""
    try:
        cls_name, options = parse_sampler_name(name)
        typed_options(scheduler_class(cls_name), options)
    except (ValueError, ModuleNotFoundError) as err:
        return str(err)
    return None


@dataclass(frozen=True)
class DiffusersSampler(Sampler):
    """A diffusers scheduler's loop over segldm's noise predictor (``steps`` = ``num_inference_steps``).

    ``schedule`` is the model's ``model.diffusion`` settings (the scheduler then has the exported
    pipeline's config); None builds ``trained_betas`` from the ``alphas_cumprod`` given to
    :meth:`sample`.
    """

    scheduler: str = "UniPCMultistepScheduler"
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    schedule: Mapping[str, Any] | None = field(default=None, hash=False, compare=False)
    name: ClassVar[str] = "diffusers"
    # diffusers' schedulers divide by the SNR at t = T - 1 (or start below it): refused in :meth:`sample`
    supports_zero_terminal_snr: ClassVar[bool] = False

    @property
    def spec(self) -> str:
        """The sampler's name as a user writes it, ``diffusers:Class(key=value,...)``."""
        options = ",".join(f"{k}={format_value(v)}" for k, v in self.options.items())
        return f"{DIFFUSERS_PREFIX}{self.scheduler}" + (f"({options})" if options else "")

    def make_scheduler(self, alphas_cumprod: torch.Tensor) -> Any:
        """The diffusers scheduler for a model with this ``alphas_cumprod``, options applied."""
        cls = scheduler_class(self.scheduler)
        try:
            options = typed_options(cls, self.options)
        except ValueError as err:
            raise ValueError(f"sampler {self.spec}: {err}") from None
        num_timesteps = len(alphas_cumprod)
        if self.schedule is not None:
            config = ddim_scheduler_config({**self.schedule, "parameterization": "eps"})
        else:
            config = ddim_scheduler_config({"timesteps": num_timesteps})
            ac = alphas_cumprod.detach().double().cpu()
            config["trained_betas"] = (1.0 - ac / torch.cat([ac.new_ones(1), ac[:-1]])).tolist()
        try:
            return cls.from_config({**config, **options})
        except (ValueError, NotImplementedError, TypeError) as err:
            raise ValueError(f"sampler {self.spec}: diffusers refused the options: {err}") from None

    def check(self, num_timesteps: int, steps_key: str) -> None:
        """The class, the options, and ``steps`` giving integer timesteps within the model's T."""
        super().check(num_timesteps, steps_key)
        steps = int(self.steps)
        if steps > num_timesteps:
            raise ValueError(f"{steps_key}={steps}: more steps than the model's {num_timesteps} timesteps")
        alphas_cumprod = schedule_alphas({**(self.schedule or {}), "timesteps": num_timesteps})
        scheduler = self.make_scheduler(alphas_cumprod)
        timesteps_of(scheduler, steps, steps_key, self.spec)

    def sample(
        self,
        model_fn: ModelFn,
        x_T: torch.Tensor,
        alphas_cumprod: torch.Tensor,
        generators: Sequence[torch.Generator] | None = None,
        progress: bool = False,
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        if bool(alphas_cumprod[-1] == 0) and not self.supports_zero_terminal_snr:
            raise ValueError(
                f"sampler {self.spec}: the schedule has zero terminal SNR, which only segldm's "
                f"{' and '.join(zero_terminal_snr_samplers())} sampler samples"
            )
        scheduler = self.make_scheduler(alphas_cumprod)
        check_same_schedule(scheduler, alphas_cumprod, self.spec)
        batch = x_T.shape[0]
        if generators is not None and len(generators) != batch:
            raise ValueError(f"got {len(generators)} generators for a batch of {batch}")
        timesteps = timesteps_of(scheduler, int(self.steps), "steps", self.spec, device=x_T.device)
        step_parameters = inspect.signature(scheduler.step).parameters
        step_kwargs: dict[str, Any] = {}
        if "generator" in step_parameters:
            step_kwargs["generator"] = list(generators) if generators is not None else None
        if "eta" in step_parameters:
            step_kwargs["eta"] = float(self.eta)

        x = x_T * scheduler.init_noise_sigma
        intermediates: dict[str, list[torch.Tensor]] = {"x_inter": [], "pred_x0": []}
        steps = zip(scheduler.timesteps, timesteps, strict=True)
        for t, t_int in tqdm(
            steps, total=len(timesteps), desc=self.scheduler, disable=not progress, leave=False
        ):
            t_batch = torch.full((batch,), t_int, device=x.device, dtype=torch.long)
            out = model_fn(scheduler.scale_model_input(x, t), t_batch)
            eps = out[0] if isinstance(out, tuple) else out
            result = scheduler.step(eps, t, x, **step_kwargs)
            x = result.prev_sample
            intermediates["x_inter"].append(x)
            pred_x0 = getattr(result, "pred_original_sample", None)
            if pred_x0 is not None:
                intermediates["pred_x0"].append(pred_x0)
        return x, intermediates


def schedule_alphas(schedule: Mapping[str, Any]) -> torch.Tensor:
    """alphas_cumprod of ``model.diffusion`` settings (float64), for checks made before a model exists."""
    betas = make_beta_schedule(
        str(schedule.get("beta_schedule", "linear")),
        int(schedule.get("timesteps", 1000)),
        float(schedule.get("linear_start", 1e-4)),
        float(schedule.get("linear_end", 2e-2)),
        float(schedule.get("cosine_s", 8e-3)),
    )
    if schedule.get("zero_terminal_snr"):
        betas = rescale_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - torch.as_tensor(betas, dtype=torch.float64), 0)


def timesteps_of(scheduler: Any, steps: int, steps_key: str, spec: str, device: Any = None) -> list[int]:
    """``scheduler.set_timesteps(steps)``'s timesteps as ints; ValueError when diffusers refuses the count,
    a timestep falls outside [0, T) or between integers (segldm's models, and their schedule, take integer
    t), or the timesteps do not run from high noise to low."""
    try:
        scheduler.set_timesteps(steps, device=device)
    except (ValueError, NotImplementedError) as err:
        raise ValueError(f"{steps_key}={steps}: sampler {spec}: {err}") from None
    values = scheduler.timesteps.detach().double().cpu()
    num_timesteps = int(scheduler.config.num_train_timesteps)
    if float(values.max()) >= num_timesteps or float(values.min()) < 0:
        raise ValueError(
            f"{steps_key}={steps}: sampler {spec} visits t={int(values.max())} (the model has t = 0..{num_timesteps - 1}): "
            "CompVis's leading timesteps with steps_offset=1 overrun at this step count (segldm's ddim refuses such "
            "counts too); use fewer steps, or add timestep_spacing=trailing to the sampler's options"
        )
    if len(values) > 1 and float(values[0]) <= float(values[-1]):
        raise ValueError(
            f"{steps_key}={steps}: sampler {spec} gives timesteps that do not descend ({int(values[0])} .. "
            f"{int(values[-1])}): diffusers' leading spacing degenerates at this step count; use fewer steps, or "
            "add timestep_spacing=trailing to the sampler's options"
        )
    fractional = values[values != values.round()]
    if len(fractional):
        raise ValueError(
            f"sampler {spec} with {steps_key}={steps} evaluates the model between integer timesteps (e.g. "
            f"t={float(fractional[0]):.3f}); segldm's models take integer t: keep integer timesteps "
            "(timestep_spacing=leading or trailing; no use_karras_sigmas on the Euler, Heun and LMS schedulers)"
        )
    return [int(v) for v in values]


def check_same_schedule(scheduler: Any, alphas_cumprod: torch.Tensor, spec: str) -> None:
    """ValueError when the scheduler's alphas_cumprod is not the model's (to :data:`SCHEDULE_TOLERANCE`)."""
    theirs = scheduler.alphas_cumprod.detach().double().cpu()
    ours = alphas_cumprod.detach().double().cpu()
    if theirs.shape != ours.shape:
        raise ValueError(f"sampler {spec}: the scheduler has {len(theirs)} timesteps, the model {len(ours)}")
    difference = float(((theirs - ours).abs() / ours.abs().clamp_min(1e-12)).max())
    if difference > SCHEDULE_TOLERANCE:
        raise ValueError(
            f"sampler {spec}: the scheduler's alphas_cumprod differs from the model's (max relative difference "
            f"{difference:.2e} > {SCHEDULE_TOLERANCE:g}): the model's model.diffusion settings do not describe "
            "its schedule buffers"
        )


def diffusers_sampler(name: str, steps: int, eta: float, **settings: Any) -> DiffusersSampler:
    """The sampler ``name`` (``diffusers:Class(options)``); ``options=`` adds options given as a mapping,
    ``schedule=`` the model's ``model.diffusion``; other settings (other samplers' keys) are ignored."""
    cls_name, options = parse_sampler_name(name)
    extra = dict(settings.get("options") or {})
    both = sorted(set(options) & set(extra))
    if both:
        raise ValueError(f"sampler {name!r}: options {both} are given in the name and as options")
    schedule = settings.get("schedule")
    return DiffusersSampler(
        steps=int(steps),
        eta=float(eta),
        scheduler=cls_name,
        options={**options, **extra},
        schedule=dict(schedule) if schedule is not None else None,
    )


__all__ = [
    "INSTALL_HELP",
    "DiffusersSampler",
    "diffusers_sampler",
    "parse_sampler_name",
    "require_diffusers",
    "sampler_name_problem",
    "supported_schedulers",
]


register_family(
    DIFFUSERS_PREFIX,
    SamplerFamily(
        build=diffusers_sampler,
        problem=sampler_name_problem,
        sampler_type=DiffusersSampler,
        settings=("options",),
    ),
)
