"""First-stage training: a LightningModule around `VQModel` (reconstruction + codebook losses).

The VQModel is kept as `self.vq`, so a segldm autoencoder checkpoint holds the CompVis VQ key
layout under the `vq.` prefix, and `load_first_stage_weights` reads it back into an LDM.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from einops import rearrange

from segldm.lr_schedulers import effective_learning_rate, optimizer_config
from segldm.models.autoencoder import VQModel
from segldm.models.ldm import check_finite, report_learning_rate


class VQAutoencoderModule(L.LightningModule):
    """Trains the VQ-f4 first stage: L1 (+ optional L2) reconstruction plus the VQ codebook loss."""

    def __init__(
        self,
        first_stage: VQModel,
        *,
        image_key: str = "image",
        base_learning_rate: float = 4.5e-6,
        scale_lr: bool = True,
        adam_betas: Sequence[float] = (0.5, 0.9),
        codebook_weight: float = 1.0,
        l1_weight: float = 1.0,
        l2_weight: float = 0.0,
        scheduler: Callable[[int], float] | None = None,
    ) -> None:
        super().__init__()
        self.vq = first_stage
        self.image_key = image_key
        self.base_learning_rate = base_learning_rate
        self.learning_rate = base_learning_rate
        self.scale_lr = scale_lr
        self.adam_betas = tuple(adam_betas)
        self.codebook_weight = codebook_weight
        self.l1_weight = l1_weight
        self.l2_weight = l2_weight
        self.lr_lambda = scheduler
        self.segldm_config: dict[str, Any] | None = None

    def get_input(self, batch: dict[str, Any]) -> torch.Tensor:
        return rearrange(batch[self.image_key], "b h w c -> b c h w").contiguous().float()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.vq(x)

    def losses(self, batch: dict[str, Any], prefix: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self.get_input(batch)
        reconstruction, codebook_loss, indices = self(x)
        l1 = (reconstruction - x).abs().mean()
        l2 = (reconstruction - x).pow(2).mean()
        loss = self.l1_weight * l1 + self.l2_weight * l2 + self.codebook_weight * codebook_loss
        counts = torch.bincount(indices.flatten(), minlength=self.vq.quantize.n_e).float()
        probs = counts / counts.sum()
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        logs = {
            f"{prefix}/loss": loss,
            f"{prefix}/rec_l1": l1,
            f"{prefix}/rec_l2": l2,
            f"{prefix}/codebook_loss": codebook_loss,
            f"{prefix}/perplexity": perplexity,
            f"{prefix}/codes_used": (counts > 0).sum().float(),
        }
        return loss, logs

    def training_step(self, batch: dict[str, Any] | None, batch_idx: int) -> torch.Tensor | None:
        if batch is None:  # every sample was skipped (data.on_error=skip): Lightning skips the step
            return None
        loss, logs = self.losses(batch, "train")
        check_finite(loss, self.global_step, batch_idx)
        self.log("train/loss", logs.pop("train/loss"), on_step=True, on_epoch=False, prog_bar=True)
        self.log_dict(logs, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: dict[str, Any] | None, batch_idx: int) -> None:
        if batch is None:  # every sample of the batch was skipped (data.on_error=skip)
            return
        _, logs = self.losses(batch, "val")
        self.log_dict(
            logs, on_step=False, on_epoch=True, batch_size=batch[self.image_key].shape[0], sync_dist=True
        )  # with DDP: the mean over every rank's validation shard

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.vq(x)[0].clamp(-1, 1)

    def configure_optimizers(self):
        self.learning_rate = effective_learning_rate(self.base_learning_rate, self._trainer, self.scale_lr)
        report_learning_rate(self, self.learning_rate)
        optimizer = torch.optim.Adam(self.vq.parameters(), lr=self.learning_rate, betas=self.adam_betas)
        return optimizer_config(optimizer, self.lr_lambda)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["segldm"] = {"kind": "autoencoder", "config": self.segldm_config}
