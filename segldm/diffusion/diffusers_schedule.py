"""The training noise schedule and CompVis's DDIM conventions as a diffusers scheduler config (no diffusers import).

Names differ: CompVis's ``linear`` schedule (linear in sqrt(beta)) is diffusers' ``scaled_linear``,
CompVis's ``sqrt_linear`` (linear in beta) is diffusers' ``linear``; other schedules (cosine, sqrt,
zero-terminal-SNR rescaled) are written as ``trained_betas``, exactly. CompVis's DDIM visits
``range(0, T, T // S) + 1`` (``timestep_spacing="leading"`` with ``steps_offset=1``) and ends on
``alphas_cumprod[0]`` rather than 1 (``set_alpha_to_one=False``); no x0 clipping. ``trailing``
discretization is diffusers' ``trailing`` spacing.

One config serves both directions: the diffusers export writes it as the folder's ``DDIMScheduler``
(segldm.compat.diffusers.scheduler), and the ``diffusers:<SchedulerClass>`` samplers
(segldm.diffusion.diffusers_samplers) build their scheduler from it, as a diffusers user swaps a
pipeline's scheduler with ``OtherScheduler.from_config(pipe.scheduler.config)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from segldm.diffusion.schedule import make_beta_schedule, rescale_zero_terminal_snr

PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
NAMED_SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear"}  # CompVis name -> diffusers name
SPACINGS = {"uniform": ("leading", 1), "trailing": ("trailing", 0)}
# the keys that carry the model's training schedule and prediction (no sampler option may change them)
SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "rescale_betas_zero_snr",
)


def ddim_scheduler_config(
    diffusion: Mapping[str, Any], ddim_discretization: str = "uniform"
) -> dict[str, Any]:
    """``DDIMScheduler`` config (without ``_class_name``) for ``model.diffusion`` settings and a DDIM
    discretization; ValueError naming the key for a setting diffusers has no counterpart of."""
    parameterization = str(diffusion.get("parameterization", "eps"))
    if parameterization not in PREDICTION_TYPES:
        raise ValueError(
            f"model.diffusion.parameterization={parameterization!r} has no diffusers prediction_type"
        )
    if ddim_discretization not in SPACINGS:
        raise ValueError(
            f"model.sampler.ddim_discretization={ddim_discretization!r} has no diffusers timestep_spacing "
            f"(exported: {sorted(SPACINGS)}); export a model whose sampler uses one of those"
        )
    spacing, offset = SPACINGS[ddim_discretization]
    schedule = str(diffusion.get("beta_schedule", "linear"))
    timesteps = int(diffusion.get("timesteps", 1000))
    start, end = float(diffusion.get("linear_start", 1e-4)), float(diffusion.get("linear_end", 2e-2))
    config: dict[str, Any] = {
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


__all__ = ["NAMED_SCHEDULES", "PREDICTION_TYPES", "SCHEDULE_KEYS", "SPACINGS", "ddim_scheduler_config"]
