"""Classifier-free guidance (Ho & Salimans 2022), as SDM (Wang et al. 2022) uses it on masks.

eps = eps_uncond + s * (eps_cond - eps_uncond): s = 1 is the conditional model alone, s > 1 pushes
samples towards their mask. Both predictions come from one batched UNet call (the batch doubled),
as CompVis's DDIMSampler computes them. The unconditional condition is the null condition the model
was trained with (condition dropout, ``model.diffusion.cond_drop_prob``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

ApplyModel = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def check_guidance_scale(scale: float, key: str) -> None:
    """ValueError naming ``key`` for a scale below 1 (1 = off; below would push away from the mask)."""
    if not float(scale) >= 1.0:
        raise ValueError(f"{key}={scale}: classifier-free guidance scale must be >= 1 (1 = no guidance)")


def guidance_problem(scale: float, key: str, cond_drop_prob: float, force: bool = False) -> str | None:
    """Why ``scale`` cannot guide a model trained with condition dropout ``cond_drop_prob``, or None:
    below 1, or above 1 for a model that never learned the unconditional prediction guidance
    subtracts (``force``: sample it anyway). Start-up checks and sampling both ask it."""
    try:
        check_guidance_scale(scale, key)
    except ValueError as err:
        return str(err)
    if float(scale) == 1.0 or float(cond_drop_prob) > 0 or force:
        return None
    return (
        f"{key}={scale}: this model was trained without condition dropout (model.diffusion.cond_drop_prob=0); "
        "a scale other than 1 guides a model trained without condition dropout away from an unconditional "
        f"prediction it never learned. Train with model.diffusion.cond_drop_prob>0 (e.g. 0.1), use {key}=1, or, "
        "sampling a trained model, insist with force_guidance=true"
    )


def guided_eps(
    apply_model: ApplyModel, x: torch.Tensor, t: torch.Tensor, cond: Any, scale: float, uncond: Any | None
) -> torch.Tensor:
    """eps_uncond + scale * (eps_cond - eps_uncond), both from one batched ``apply_model`` call."""
    if uncond is None or scale == 1.0:
        return apply_model(x, t, cond)
    x_in, t_in = torch.cat([x] * 2), torch.cat([t] * 2)
    if torch.is_tensor(cond):
        c_in: Any = torch.cat([uncond, cond])
    else:  # a list of concat maps, as CompVis's c_concat
        c_in = [torch.cat([u, c]) for u, c in zip(uncond, cond, strict=True)]
    eps_uncond, eps_cond = apply_model(x_in, t_in, c_in).chunk(2)
    return eps_uncond + scale * (eps_cond - eps_uncond)
