"""Sampling of a LatentDiffusion: the registered samplers, classifier-free guidance, CompVis's
``sample_log``, and masks -> images (``generate``). A mixin, so LatentDiffusion keeps CompVis's method
names while this concern lives in its own module."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from segldm.diffusion.compvis_ddim import DDIMSampler
from segldm.diffusion.ddim import per_sample_randn
from segldm.diffusion.guidance import guidance_problem, guided_eps
from segldm.diffusion.objectives import eps_from_prediction, x0_from_prediction
from segldm.diffusion.samplers import (
    Sampler,
    SamplerSettings,
    sampler_name_problem,
    zero_terminal_snr_samplers,
)


def sampler_run_problems(
    settings: SamplerSettings,
    timesteps: int,
    schedule: Mapping[str, Any] | None,
    runs: Mapping[str, tuple[str, str, int]],
) -> list[str]:
    """Each sampling run, ``steps key -> (name key, sampler name, steps)``, checked by the sampler that
    runs it (DDIM: CompVis's +1 shift keeps t inside the schedule) with ``settings``' options; a bad
    name or option is reported once however many runs share it. ``schedule``: ``model.diffusion``
    (diffusers: samplers build their scheduler from it)."""
    problems: list[str] = []

    def add(problem: str) -> None:
        if problem not in problems:
            problems.append(problem)

    for steps_key, (name_key, name, steps) in runs.items():
        name_problem = sampler_name_problem(str(name))
        if name_problem:
            add(f"{name_key}={name!r} {name_problem}")
        if int(steps) <= 0:
            add(f"{steps_key}={steps} must be positive")
        if name_problem or int(steps) <= 0:
            continue
        try:
            settings.override(name=name, steps=int(steps)).build(schedule).check(int(timesteps), steps_key)
        except (ValueError, ModuleNotFoundError) as err:
            add(str(err))
    return problems


class Sampling:
    """Sampling methods of :class:`segldm.training.ldm.LatentDiffusion` (they use its attributes)."""

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        steps: int | None = None,
        eta: float | None = None,
        x_T: torch.Tensor | None = None,
        generators: Sequence[torch.Generator] | None = None,
        use_ema: bool = True,
        progress: bool = False,
        return_intermediates: bool = False,
        sampler: str | None = None,
        guidance_scale: float | None = None,
    ):
        """Sample latents from encoded conditioning with a registered sampler (segldm.diffusion.samplers;
        DDIM over CompVis's 'uniform' schedule by default). With `generators` (one per sample), the
        initial noise and every step's noise of sample i come from generator i only, so an image does
        not depend on its batch.
        """
        sampler_obj = self.make_sampler(steps, eta, sampler)
        shape = (cond.shape[0], self.channels, cond.shape[2], cond.shape[3])
        if x_T is None:
            x_T = per_sample_randn(shape, generators, cond.device, torch.float32)

        scale = float(self.sampler_settings.guidance_scale if guidance_scale is None else guidance_scale)
        uncond = self.null_condition(cond) if scale != 1.0 else None

        zero_terminal = bool(self.alphas_cumprod[-1] == 0)

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
            # the sampler's update stays float32; with guidance, one UNet call on the doubled batch
            prediction = guided_eps(self.apply_model, x, t, cond, scale, uncond).float()
            a = self.alphas_cumprod[t]
            eps = eps_from_prediction(self.parameterization, prediction, x, a)
            if zero_terminal:  # x0 from the prediction itself: finite at a = 0, where x0 from eps is 0/0
                return eps, x0_from_prediction(self.parameterization, prediction, x, a)
            return eps

        with self.ema_scope() if use_ema else nullcontext():
            samples, intermediates = sampler_obj.sample(
                model_fn, x_T, self.alphas_cumprod, generators, progress
            )
        return (samples, intermediates) if return_intermediates else samples

    @torch.no_grad()
    def sample_log(
        self, cond: torch.Tensor, batch_size: int, ddim: bool, ddim_steps: int, **kwargs: Any
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """CompVis's ``LatentDiffusion.sample_log``: DDIM latents and intermediates for encoded conditioning.

        Like the reference, it samples with the weights as they are (wrap it in ``model.ema_scope()``
        for the EMA ones) and from the global random stream; ``kwargs`` go to
        :class:`segldm.diffusion.compvis_ddim.DDIMSampler` (eta, x_T, guidance, log_every_t, ...).
        """
        if not ddim:
            raise NotImplementedError(
                "sample_log(ddim=False) runs CompVis's 1000-step ancestral DDPM sampler, which segldm does "
                "not implement; use ddim=True (ddim_steps=num_timesteps with eta=1 is the closest)"
            )
        shape = (self.channels, int(cond.shape[-2]), int(cond.shape[-1]))
        return DDIMSampler(self).sample(ddim_steps, batch_size, shape, cond, verbose=False, **kwargs)

    def make_sampler(
        self, steps: int | None = None, eta: float | None = None, name: str | None = None
    ) -> Sampler:
        """The sampler object for these settings, each None taken from ``model.sampler`` (the defaults)."""
        settings = self.sampler_settings.override(name=name, steps=steps, eta=eta)
        # diffusers: samplers build their scheduler from the model's model.diffusion
        return settings.build(schedule=getattr(self, "diffusion_settings", None))

    def check_sampler_settings(
        self,
        steps: int | None,
        sampler: str | None,
        steps_key: str,
        guidance_scale: float | None = None,
        guidance_key: str = "guidance_scale",
        force_guidance: bool = False,
    ) -> None:
        """Before any sampling: the sampler exists and can run `steps` (None: the defaults) here, and the
        guidance scale is >= 1 and meets a model trained with condition dropout.

        Raises ValueError naming the config key the value came from.
        """
        if steps is None:
            steps_key = "the checkpoint's model.sampler.steps"
        sampler_obj = self.make_sampler(steps, None, sampler)
        sampler_obj.check(self.num_timesteps, steps_key)
        if bool(self.alphas_cumprod[-1] == 0) and not sampler_obj.supports_zero_terminal_snr:
            able = " or ".join(zero_terminal_snr_samplers())
            raise ValueError(
                f"sampler {sampler_obj.name}: this model's schedule has zero terminal SNR (log-SNR -inf at the "
                f"last timestep), which only {able} samples; use the {able} sampler"
            )
        scale = self.sampler_settings.guidance_scale if guidance_scale is None else guidance_scale
        problem = guidance_problem(float(scale), guidance_key, self.cond_drop_prob, force_guidance)
        if problem:
            raise ValueError(problem)

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """The unconditional input guidance compares with (the condition's: zeros, what dropout trained on)."""
        return self.condition.null(cond)

    @torch.no_grad()
    def generate(
        self,
        segmentation: torch.Tensor,
        steps: int | None = None,
        eta: float | None = None,
        seeds: Sequence[int] | None = None,
        use_ema: bool = True,
        progress: bool = False,
        sampler: str | None = None,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """Masks -> images (B, 3, H, W) in [-1, 1]; masks are condition inputs (``self.condition``): dense
        float maps (B, C, H, W) or integer label maps (B, H, W), which take the fused path (no one-hot built)."""
        if torch.is_floating_point(segmentation):
            segmentation = segmentation.to(self.device, torch.float32)
        cond = self.get_learned_conditioning(segmentation.to(self.device))
        generators = None
        if seeds is not None:
            generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]
        latents = self.sample(
            cond,
            steps,
            eta,
            generators=generators,
            use_ema=use_ema,
            progress=progress,
            sampler=sampler,
            guidance_scale=guidance_scale,
        )
        return self.decode_first_stage(latents).clamp(-1, 1)

    @torch.no_grad()
    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """CompVis's mask visualisation: a random 3 x C projection, min-max scaled over the batch."""
        x = x.float()
        if self.colorize is None or self.colorize.shape[1] != x.shape[1]:
            self.colorize = torch.randn(3, x.shape[1], 1, 1).to(x)
        x = F.conv2d(x, weight=self.colorize.to(x))
        return 2.0 * (x - x.min()) / (x.max() - x.min()) - 1.0
