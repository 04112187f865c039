"""CompVis's ``DDIMSampler`` API (``ldm.models.diffusion.ddim``) over any model with CompVis's
``apply_model(x, t, cond)``, ``alphas_cumprod``, ``num_timesteps`` and ``device``.

The scripts CompVis users already have (``DDIMSampler(model).sample(S, batch_size, shape,
conditioning, eta=..., unconditional_guidance_scale=..., unconditional_conditioning=..., x_T=...)``,
``model.sample_log(...)``) run on segldm models with only their imports changed. The arithmetic
is segldm's DDIM (:mod:`.ddim`, equal to the reference's); the intermediates are logged as the
reference logs them (x_T, then every ``log_every_t``-th step and the first). Classifier-free
guidance runs the conditional and unconditional passes in one batched call, as the reference does.
What the reference offers for inpainting and score correction is refused by name, not ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from segldm.diffusion.ddim import check_ddim_steps, ddim_parameters, make_ddim_timesteps
from segldm.diffusion.guidance import guided_eps

UNSUPPORTED = {  # argument: (the reference's default, why segldm refuses another value)
    "mask": (None, "inpainting with a known-region mask"),
    "x0": (None, "inpainting with a known-region mask"),
    "quantize_x0": (False, "quantizing pred_x0 through the first stage"),
    "temperature": (1.0, "noise temperature"),
    "noise_dropout": (0.0, "noise dropout"),
    "score_corrector": (None, "score correctors"),
    "normals_sequence": (None, "a given normals sequence"),
}


class DDIMSampler:
    """``DDIMSampler(model).sample(S, batch_size, shape, conditioning, ...)`` as in CompVis latent-diffusion."""

    def __init__(self, model: Any, schedule: str = "linear", **kwargs: Any) -> None:
        self.model = model
        self.ddpm_num_timesteps = int(model.num_timesteps)
        self.schedule = schedule

    @torch.no_grad()
    def sample(
        self,
        S: int,
        batch_size: int,
        shape: Sequence[int],
        conditioning: Any = None,
        callback: Any = None,
        normals_sequence: Any = None,
        img_callback: Any = None,
        quantize_x0: bool = False,
        eta: float = 0.0,
        mask: Any = None,
        x0: Any = None,
        temperature: float = 1.0,
        noise_dropout: float = 0.0,
        score_corrector: Any = None,
        corrector_kwargs: Any = None,
        verbose: bool = True,
        x_T: torch.Tensor | None = None,
        log_every_t: int = 100,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        given = {
            "mask": mask,
            "x0": x0,
            "quantize_x0": quantize_x0,
            "temperature": temperature,
            "noise_dropout": noise_dropout,
            "score_corrector": score_corrector,
            "normals_sequence": normals_sequence,
        }
        for name, value in given.items():
            default, what = UNSUPPORTED[name]
            if value is not default and value != default:
                raise NotImplementedError(
                    f"DDIMSampler.sample({name}=...): segldm does not implement {what}; leave {name} at "
                    f"{default!r} (segldm.sample / segldm.eval cover mask-to-image sampling)"
                )
        if unconditional_guidance_scale != 1.0 and unconditional_conditioning is None:
            raise ValueError(
                "unconditional_guidance_scale != 1 needs unconditional_conditioning (CompVis's rule)"
            )
        if conditioning is not None and torch.is_tensor(conditioning) and conditioning.shape[0] != batch_size:
            print(f"Warning: Got {conditioning.shape[0]} conditionings but batch-size is {batch_size}")
        check_ddim_steps(int(S), self.ddpm_num_timesteps, "S (DDIM steps)")
        timesteps = make_ddim_timesteps("uniform", int(S), self.ddpm_num_timesteps)
        params = ddim_parameters(self.model.alphas_cumprod, timesteps, float(eta))
        if verbose:
            print(f"Data shape for DDIM sampling is {(batch_size, *shape)}, eta {eta}")
            print(f"Running DDIM Sampling with {len(params)} timesteps")
        device = self.model.device
        img = torch.randn((batch_size, *shape), device=device) if x_T is None else x_T.to(device)
        intermediates: dict[str, list[torch.Tensor]] = {"x_inter": [img], "pred_x0": [img]}
        total = len(params)
        for i, index in enumerate(reversed(range(total))):
            t = torch.full((batch_size,), int(params.timesteps[index]), device=device, dtype=torch.long)
            eps = guided_eps(
                self.model.apply_model,
                img,
                t,
                conditioning,
                float(unconditional_guidance_scale),
                unconditional_conditioning,
            ).float()
            noise = torch.randn(img.shape, device=device, dtype=img.dtype)
            img, pred_x0 = params.step(img, eps, index, noise)
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(pred_x0, i)
            if index % log_every_t == 0 or index == total - 1:
                intermediates["x_inter"].append(img)
                intermediates["pred_x0"].append(pred_x0)
        return img, intermediates
