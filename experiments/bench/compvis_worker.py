"""The real CompVis code's side of `make bench`'s reference section (started by segldm_bench.reference).

    python experiments/bench/compvis_worker.py SETUP LATENT_DIFFUSION_DIR TAMING_DIR

Builds CompVis latent-diffusion's own ``LatentDiffusion`` (``ldm.util.instantiate_from_config``) from
the setup's CompVis config, loads the same checkpoint as segldm's side strictly, and serves the same
tasks as ``segldm_worker.py`` beside it the way the reference runs them:

* ``unet``: UNet forward + L1 to the noise + backward, fp32;
* ``step``: ``shared_step`` on a batch whose float one-hot is already built (free), backward, torch's
  default AdamW over the UNet and the cond stage (its ``configure_optimizers``), the EMA update of
  its ``on_train_batch_end``;
* ``step_loader_one_hot``: the same, with the one-hot built as its S-FLCKR loader does
  (``np.eye(n_labels)[segmentation]`` per sample, float64, collated, then ``.float()``);
* ``sample``: its ``DDIMSampler`` (eta 0, fixed ``x_T``) under ``ema_scope``;
* ``ema``: its ``LitEma`` update alone.

Only this process sees the reference's dependencies, and they are stubbed here, never in segldm:
PyTorch Lightning 1.x (``LightningModule`` as a plain ``nn.Module`` with ``device`` and no-op
logging; ``rank_zero_only``), ``clip`` and ``kornia`` (imported by its text encoders, unused here),
and ``DDIMSampler.register_buffer``, which moves every buffer to CUDA unconditionally, moved to the
model's device instead. None of the reference's code is copied: it is imported from the checkouts.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from segldm_bench.workers import BenchWorker


class _LightningModule(nn.Module):
    """What the reference's modules use of PL 1.x's LightningModule on this path."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def log(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_dict(self, *args: Any, **kwargs: Any) -> None:
        pass


def install_stubs() -> None:
    pl = types.ModuleType("pytorch_lightning")
    pl.LightningModule = _LightningModule  # type: ignore[attr-defined]
    pl.Callback = object  # type: ignore[attr-defined]
    utilities = types.ModuleType("pytorch_lightning.utilities")
    distributed = types.ModuleType("pytorch_lightning.utilities.distributed")
    distributed.rank_zero_only = lambda fn: fn  # type: ignore[attr-defined]
    utilities.distributed = distributed  # type: ignore[attr-defined]
    pl.utilities = utilities  # type: ignore[attr-defined]
    sys.modules.update(
        {
            "pytorch_lightning": pl,
            "pytorch_lightning.utilities": utilities,
            "pytorch_lightning.utilities.distributed": distributed,
            "clip": types.ModuleType("clip"),
            "kornia": types.ModuleType("kornia"),
        }
    )


class CompVisWorker(BenchWorker):
    side = "CompVis latent-diffusion"

    def __init__(self, setup_path: str, ldm_dir: str, taming_dir: str) -> None:
        super().__init__(setup_path)
        install_stubs()
        sys.path[:0] = [str(Path(ldm_dir).resolve()), str(Path(taming_dir).resolve())]
        from ldm.models.diffusion.ddim import DDIMSampler  # the reference, from its checkout
        from ldm.util import instantiate_from_config

        def register_buffer(sampler: Any, name: str, attr: Any) -> None:
            setattr(sampler, name, attr.to(sampler.model.device) if isinstance(attr, torch.Tensor) else attr)

        DDIMSampler.register_buffer = register_buffer
        self.sampler_class = DDIMSampler
        s = self.setup
        config = OmegaConf.load(s["config_path"])
        self.model = instantiate_from_config(config.model)
        state = torch.load(s["ckpt_path"], map_location="cpu", weights_only=True)["state_dict"]
        self.model.load_state_dict(state, strict=True)
        self.model.train()
        self.n_labels = int(s["n_labels"])
        images, label_maps = s["images"], s["label_maps"]
        one_hot = torch.nn.functional.one_hot(label_maps.long(), self.n_labels).float()
        self.batch = {"image": images, "segmentation": one_hot}
        self.optimizer: torch.optim.Optimizer | None = None
        with torch.no_grad():
            self.z = self.model.get_first_stage_encoding(
                self.model.encode_first_stage(images.permute(0, 3, 1, 2).contiguous())
            )
            self.c = self.model.get_learned_conditioning(one_hot.permute(0, 3, 1, 2).contiguous())
            self.x_noisy = self.model.q_sample(self.z, s["t"], s["noise"])
        self.tasks = {
            "unet": self.unet_step,
            "step": lambda: self.step(self.batch),
            "step_loader_one_hot": lambda: self.step(self.loader_batch()),
            "sample": self.samples,
            "ema": lambda: self.model.model_ema(self.model.model),
        }

    def unet_step(self) -> None:
        s = self.setup
        out = self.model.apply_model(self.x_noisy, s["t"], self.c)
        (s["noise"] - out).abs().mean().backward()
        self.model.model.zero_grad(set_to_none=True)

    def loader_batch(self) -> dict[str, torch.Tensor]:
        """The batch as the reference's SegmentationBase + default collate ship it."""
        eye = np.eye(self.n_labels)
        segmentation = torch.stack([torch.from_numpy(eye[m]) for m in self.setup["label_maps"].numpy()])
        return {"image": self.setup["images"], "segmentation": segmentation}

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        model = self.model
        if self.optimizer is None:  # LatentDiffusion.configure_optimizers (cond stage trainable)
            params = list(model.model.parameters())
            if model.cond_stage_trainable:
                params += list(model.cond_stage_model.parameters())
            self.optimizer = torch.optim.AdamW(params, lr=float(self.setup["lr"]))
        loss, _ = model.shared_step(batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if model.use_ema:  # on_train_batch_end
            model.model_ema(model.model)

    def samples(self) -> torch.Tensor:
        s, model = self.setup, self.model
        shape = tuple(self.z.shape[1:])
        with torch.no_grad(), model.ema_scope():
            samples, _ = self.sampler_class(model).sample(
                S=int(s["sampler_steps"]), batch_size=len(self.z), shape=shape, conditioning=self.c,
                eta=0.0, x_T=s["x_T"], verbose=False,
            )  # fmt: skip
        return samples


if __name__ == "__main__":
    CompVisWorker(*sys.argv[1:4]).serve()
