"""The training noise schedule and segldm's DDIM as a diffusers ``DDIMScheduler`` config.

Names differ: CompVis's ``linear`` schedule (linear in sqrt(beta)) is diffusers' ``scaled_linear``,
CompVis's ``sqrt_linear`` (linear in beta) is diffusers' ``linear``; other schedules (cosine, sqrt,
zero-terminal-SNR rescaled) are written as ``trained_betas``, exactly. CompVis's DDIM visits
``range(0, T, T // S) + 1`` (``timestep_spacing="leading"`` with ``steps_offset=1``) and ends on
``alphas_cumprod[0]`` rather than 1 (``set_alpha_to_one=False``); no x0 clipping. ``trailing``
discretization is diffusers' ``trailing`` spacing. The two visit the same timesteps when the step
count divides T (CompVis takes ceil(T / (T // S)) steps otherwise) and, for ``trailing``, when
T / S is a whole number (diffusers steps back by T // S).

diffusers keeps ``alphas_cumprod`` as a float32 cumulative product where segldm takes it in float64
and rounds once; the two differ by a few units in the 7th digit, which is what separates the images
of the two implementations (docs/diffusers.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from segldm.diffusion.schedule import make_beta_schedule, rescale_zero_terminal_snr
from segldm.models.diffusers_vq import DiffusersLayoutError

SCHEDULER_CLASS = "DDIMScheduler"
PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
NAMED_SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear"}  # CompVis name -> diffusers name
SPACINGS = {"uniform": ("leading", 1), "trailing": ("trailing", 0)}


def scheduler_config(
    diffusion: Mapping[str, Any], sampler: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``DDIMScheduler`` config for a model's ``model.diffusion`` and ``model.sampler`` settings."""
    sampler = dict(sampler or {})
    parameterization = str(diffusion.get("parameterization", "eps"))
    if parameterization not in PREDICTION_TYPES:
        raise DiffusersLayoutError(
            f"model.diffusion.parameterization={parameterization!r} has no diffusers prediction_type"
        )
    discretization = str(sampler.get("ddim_discretization", "uniform"))
    if discretization not in SPACINGS:
        raise DiffusersLayoutError(
            f"model.sampler.ddim_discretization={discretization!r} has no diffusers timestep_spacing "
            f"(exported: {sorted(SPACINGS)}); export a model whose sampler uses one of those"
        )
    spacing, offset = SPACINGS[discretization]
    schedule = str(diffusion.get("beta_schedule", "linear"))
    timesteps = int(diffusion.get("timesteps", 1000))
    start, end = float(diffusion.get("linear_start", 1e-4)), float(diffusion.get("linear_end", 2e-2))
    config: dict[str, Any] = {
        "_class_name": SCHEDULER_CLASS,
        "num_train_timesteps": timesteps,
        "beta_start": start,
        "beta_end": end,
        "beta_schedule": NAMED_SCHEDULES.get(schedule, "linear"),
        "trained_betas": None,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": offset,
        "prediction_type": PREDICTION_TYPES[parameterization],
        "thresholding": False,
        "timestep_spacing": spacing,
        "rescale_betas_zero_snr": False,
    }
    if schedule not in NAMED_SCHEDULES or diffusion.get("zero_terminal_snr"):
        betas = make_beta_schedule(schedule, timesteps, start, end, float(diffusion.get("cosine_s", 8e-3)))
        if diffusion.get("zero_terminal_snr"):
            betas = rescale_zero_terminal_snr(betas)
        config["trained_betas"] = [float(b) for b in betas]
    return config


__all__ = ["PREDICTION_TYPES", "SCHEDULER_CLASS", "scheduler_config"]
