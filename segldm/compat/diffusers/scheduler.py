"""The training noise schedule and segldm's DDIM as the exported folder's ``DDIMScheduler`` config.

The mapping itself (CompVis ``linear`` = diffusers ``scaled_linear``, ``steps_offset=1``,
``set_alpha_to_one=False``, ``trained_betas`` for the other schedules) lives in
:mod:`segldm.diffusion.diffusers_schedule`, which the ``diffusers:<SchedulerClass>`` samplers share.
The two visit the same timesteps when the step count divides T (CompVis takes ceil(T / (T // S))
steps otherwise) and, for ``trailing``, when T / S is a whole number (diffusers steps back by T // S).

diffusers keeps ``alphas_cumprod`` as a float32 cumulative product where segldm takes it in float64
and rounds once; the two differ by a few units in the 7th digit, which is what separates the images
of the two implementations (docs/diffusers.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from segldm.diffusion.diffusers_schedule import PREDICTION_TYPES, ddim_scheduler_config
from segldm.diffusion.samplers import DDIMSampler
from segldm.models.diffusers_vq import DiffusersLayoutError

SCHEDULER_CLASS = "DDIMScheduler"


def scheduler_config(
    diffusion: Mapping[str, Any], sampler: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``DDIMScheduler`` config for a model's ``model.diffusion`` and ``model.sampler`` settings."""
    discretization = str((sampler or {}).get("ddim_discretization", DDIMSampler.ddim_discretization))
    try:
        config = ddim_scheduler_config(diffusion, discretization)
    except ValueError as err:
        raise DiffusersLayoutError(str(err)) from None
    return {"_class_name": SCHEDULER_CLASS, **config}


__all__ = ["PREDICTION_TYPES", "SCHEDULER_CLASS", "scheduler_config"]
