"""segldm's mask-to-image latent diffusion as a diffusers pipeline: label map in, image out.

This file imports only torch, numpy, PIL and diffusers, so ``python -m segldm.convert diffusers``
copies it into the folder it writes (``pipeline_segldm.py``, and ``cond_stage/`` for the
conditioning model) and the folder loads without segldm installed::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("<out dir>", trust_remote_code=True)
    image = pipe(label_map, num_inference_steps=50, generator=torch.Generator().manual_seed(0)).images[0]

With segldm installed, ``segldm.compat.diffusers.load_pipeline("<out dir>")`` builds the same
pipeline from this module's classes without running code from the folder.

The steps are segldm's (``LatentDiffusion.generate``): the label map becomes a one-hot (ignore
pixels all zero), the conditioning stage (CompVis ``SpatialRescaler``: bilinear x0.5 per stage,
then a 1x1 convolution) brings it to the latent grid, the UNet sees ``cat([z_t, c])``, the
scheduler steps, and the VQ decoder quantizes and decodes ``z / scaling_factor``. Classifier-free
guidance compares with the all-zero condition (what condition dropout trains on). To draw the
same initial noise as ``segldm.sample`` with seeds s_i, pass ``generator=[torch.Generator().
manual_seed(s_i) for each sample]`` (one generator per sample, as segldm does).
"""

import inspect
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel, VQModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

LabelMaps = torch.Tensor | np.ndarray | PIL.Image.Image | list[torch.Tensor | np.ndarray | PIL.Image.Image]


class SegLDMCondStage(ModelMixin, ConfigMixin):
    """CompVis's ``SpatialRescaler`` on a label map: one-hot, ``n_stages`` x interpolate(x multiplier), 1x1 conv."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        n_labels: int,
        ignore_label: int | None = None,
        n_stages: int = 2,
        method: str = "bilinear",
        multiplier: float = 0.5,
        out_channels: int | None = None,
        bias: bool = False,
    ):
        super().__init__()
        self.channel_mapper = (
            None if out_channels is None else nn.Conv2d(n_labels, out_channels, 1, bias=bias)
        )

    def one_hot(self, label_map: torch.Tensor) -> torch.Tensor:
        """(B, H, W) label ids -> (B, n_labels, H, W) float one-hot; ignore-label pixels all zero."""
        n_labels, ignore = int(self.config.n_labels), self.config.ignore_label
        ids = label_map.long()
        ignored = ids == ignore if ignore is not None else torch.zeros_like(ids, dtype=torch.bool)
        bad = ((ids < 0) | (ids >= n_labels)) & ~ignored
        if bad.any():
            raise ValueError(
                f"label map holds ids {torch.unique(ids[bad]).tolist()[:10]} outside [0, {n_labels}) "
                f"that are not the ignore label {ignore}"
            )
        out = torch.zeros((ids.shape[0], n_labels, *ids.shape[1:]), dtype=torch.float32, device=ids.device)
        return out.scatter_(1, ids.masked_fill(ignored, 0).unsqueeze(1), (~ignored).unsqueeze(1).float())

    def forward(self, one_hot: torch.Tensor) -> torch.Tensor:
        x = one_hot.to(self.dtype)
        for _ in range(int(self.config.n_stages)):
            x = F.interpolate(x, scale_factor=float(self.config.multiplier), mode=self.config.method)
        return x if self.channel_mapper is None else self.channel_mapper(x)

    def encode(self, label_map: torch.Tensor) -> torch.Tensor:
        """Label ids (B, H, W) -> conditioning maps on the latent grid (B, out_channels, H/4, W/4 for 2 stages)."""
        return self(self.one_hot(label_map))


def as_label_batch(label_map: LabelMaps) -> torch.Tensor:
    """A label map (H, W), a batch (B, H, W) or a list of (H, W) maps (tensors, arrays, mode-L/P images) -> (B, H, W) int64."""
    maps = label_map if isinstance(label_map, (list, tuple)) else [label_map]
    tensors = []
    for m in maps:
        t = m if torch.is_tensor(m) else torch.from_numpy(np.array(m))
        if t.is_floating_point():
            raise ValueError(
                "label maps hold integer class ids (got a float tensor; a one-hot is not accepted)"
            )
        tensors.append(t.long() if t.ndim == 3 else t.long()[None])
    if any(t.ndim != 3 for t in tensors):
        raise ValueError(
            f"a label map is (H, W) or (B, H, W); got shapes {[tuple(t.shape) for t in tensors]}"
        )
    return torch.cat(tensors)


class SegLDMPipeline(DiffusionPipeline):
    """Semantic image synthesis: label maps -> images with segldm's mask-conditioned latent diffusion."""

    model_cpu_offload_seq = "cond_stage->unet->vqvae"

    def __init__(self, vqvae: VQModel, unet: UNet2DModel, cond_stage: ModelMixin, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(vqvae=vqvae, unet=unet, cond_stage=cond_stage, scheduler=scheduler)

    def _step_kwargs(self, eta: float, generator: Any) -> dict:
        """eta and generator for schedulers whose ``step`` takes them (DDIM takes both, others neither)."""
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    @torch.no_grad()
    def __call__(
        self,
        label_map: LabelMaps,
        num_inference_steps: int = 50,
        eta: float = 0.0,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Images for label maps. ``eta``: DDIM's noise (0: deterministic); ``guidance_scale`` > 1:
        classifier-free guidance (models trained with condition dropout); ``output_type``: "pil",
        "np" (B, H, W, 3 in [0, 1]), "pt" (B, 3, H, W in [0, 1]) or "latent"."""
        if guidance_scale < 1:
            raise ValueError(f"guidance_scale={guidance_scale}: must be >= 1 (1 = no guidance)")
        device = self._execution_device
        labels = as_label_batch(label_map).to(device)
        cond = self.cond_stage.encode(labels).to(self.unet.dtype)
        shape = (labels.shape[0], self.unet.config.out_channels, cond.shape[2], cond.shape[3])
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents of shape {tuple(latents.shape)} given, these label maps need {shape}")
        latents = latents.to(device) * self.scheduler.init_noise_sigma
        uncond = torch.zeros_like(cond) if guidance_scale != 1.0 else None
        step_kwargs = self._step_kwargs(eta, generator)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            x = self.scheduler.scale_model_input(latents, t)
            if uncond is None:
                prediction = self.unet(torch.cat([x, cond], dim=1), t).sample
            else:  # one call on the doubled batch, unconditional half first (as segldm)
                doubled = torch.cat([torch.cat([x, x]), torch.cat([uncond, cond])], dim=1)
                pred_uncond, pred_cond = self.unet(doubled, t).sample.chunk(2)
                prediction = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
            latents = self.scheduler.step(prediction, t, latents, **step_kwargs).prev_sample
        if output_type == "latent":
            images = latents
        else:
            decoded = self.vqvae.decode(latents / self.vqvae.config.scaling_factor).sample
            images = (decoded.float().clamp(-1, 1) + 1) / 2
            if output_type in ("np", "pil"):
                images = images.cpu().permute(0, 2, 3, 1).numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
            elif output_type != "pt":
                raise ValueError(f"output_type={output_type!r}: expected 'pil', 'np', 'pt' or 'latent'")
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
