"""First-stage training: a LightningModule around `VQModel`.

Two recipes (`conf/model/loss/`): `l1` (L1 (+L2) reconstruction + codebook loss, one optimizer) and
`taming` (taming-transformers' `VQLPIPSWithDiscriminator`: + LPIPS + PatchGAN with the adaptive
weight, two optimizers through Lightning's manual optimisation). The VQModel is kept as `self.vq`
and the taming loss as `self.loss`, so a checkpoint holds the CompVis VQ key layout under `vq.` and
taming's `loss.*` keys as they are; `load_first_stage_weights` reads the VQ back into an LDM.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import lightning as L
import torch
from einops import rearrange

from segldm.models.autoencoder import VQModel, read_state_dict
from segldm.models.first_stage_loss import VQLPIPSWithDiscriminator
from segldm.storage.checkpoint_files import CheckpointError
from segldm.training.guards import check_finite
from segldm.training.lr_schedulers import effective_learning_rate, optimizer_config, report_learning_rate
from segldm.training.optimizers import TAMING_ADAM, build_optimizer, optimizer_factory
from segldm.training.options import (
    AUTOENCODER_OPTIONS,
    AutoencoderOptimizationOptions,
    OptionLayout,
    build_options,
    group_problems,
    move_legacy_optimizer_keys,
)


class VQAutoencoderModule(L.LightningModule):
    """Trains the VQ-f4 first stage: L1 (+ optional L2) reconstruction plus the VQ codebook loss."""

    checkpoint_kind: ClassVar[str] = "autoencoder"  # segldm.kind of its checkpoints; resuming checks it
    option_layout: ClassVar[OptionLayout] = AUTOENCODER_OPTIONS  # its groups and older flat keys

    def __init__(
        self,
        first_stage: VQModel,
        *,
        image_key: str = "image",
        optimization: Mapping[str, Any] | AutoencoderOptimizationOptions | None = None,
        codebook_weight: float = 1.0,
        l1_weight: float = 1.0,
        l2_weight: float = 0.0,
        scheduler: Callable[[int], float] | None = None,
        loss: VQLPIPSWithDiscriminator | None = None,
    ) -> None:
        super().__init__()
        self.vq = first_stage
        self.loss = loss
        if loss is not None:
            # two optimizers; the discriminator's steps go around Lightning's step counter, so
            # global_step (and trainer.max_steps) count autoencoder steps, as taming's PL 1.x did
            self.automatic_optimization = False
            if first_stage.loaded_from is not None:
                load_loss_weights(loss, first_stage.loaded_from)
        self.image_key = image_key
        if isinstance(optimization, Mapping):  # checkpoints from before the optimiser was config
            optimization = move_legacy_optimizer_keys(optimization, self.option_layout.legacy_optimizer_keys)
        optimization = build_options(AutoencoderOptimizationOptions, optimization, "optimization")
        self.base_learning_rate = optimization.base_learning_rate
        self.learning_rate = optimization.base_learning_rate
        self.scale_lr = optimization.scale_lr
        # model.optimization.optimizer, one instance each for the VQ and the discriminator
        self.optimizer_factory = optimizer_factory(
            optimization.optimizer, TAMING_ADAM, "model.optimization.optimizer"
        )
        self.codebook_weight = codebook_weight
        self.l1_weight = l1_weight
        self.l2_weight = l2_weight
        self.lr_lambda = scheduler
        self.segldm_config: dict[str, Any] | None = None

    @classmethod
    def startup_problems(cls, config: Mapping[str, Any], key: str) -> list[str]:
        """This config's option groups, and a ``loss`` left without its ``_target_`` (settings of one
        loss kept after choosing another: the defaults list merges them)."""
        problems = group_problems(config, cls.option_layout)
        loss = config.get("loss")
        if isinstance(loss, Mapping) and "_target_" not in loss:
            problems.append(
                f"{key}.loss has settings ({', '.join(sorted(loss))}) but no _target_: values set for one loss "
                f"were left over after another was chosen (model/loss=...); choose the loss in the preset's "
                "defaults list or drop those keys"
            )
        return problems

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
        logs = {
            f"{prefix}/loss": loss,
            f"{prefix}/rec_l1": l1,
            f"{prefix}/rec_l2": l2,
            f"{prefix}/codebook_loss": codebook_loss,
            **codebook_usage(indices, self.vq.quantize.n_e, prefix),
        }
        return loss, logs

    def taming_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """One autoencoder step, then one discriminator step (taming's optimizer_idx 0 and 1)."""
        assert self.loss is not None
        opt_ae, opt_disc = self.optimizers()
        x = self.get_input(batch)
        self.toggle_optimizer(opt_ae)  # no gradients for the discriminator during the generator step
        reconstruction, codebook_loss, indices = self(x)
        ae_loss, logs = self.loss.generator_loss(
            codebook_loss, x, reconstruction, self.global_step, self.last_layer(), split="train"
        )
        check_finite(ae_loss, self.global_step, batch_idx)
        opt_ae.zero_grad()
        self.manual_backward(ae_loss)
        opt_ae.step()
        self.untoggle_optimizer(opt_ae)
        step = self.global_step - 1  # the generator step just counted; taming used one step for both
        if not self.loss.discriminator_active(step):
            self.step_schedulers()
            self.log("train/aeloss", ae_loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
            self.log_dict(
                logs | codebook_usage(indices, self.vq.quantize.n_e, "train"), on_step=True, on_epoch=False
            )
            return ae_loss
        # taming runs the discriminator's step on a fresh forward of the updated autoencoder
        with torch.no_grad():
            reconstruction_after = self(x)[0]
        disc = opt_disc.optimizer if hasattr(opt_disc, "optimizer") else opt_disc
        d_loss, d_logs = self.loss.discriminator_loss(x, reconstruction_after, step, split="train")
        disc.zero_grad()
        self.manual_backward(d_loss)
        disc.step()  # the raw optimizer: not counted as a training step
        self.step_schedulers()
        logs |= d_logs | codebook_usage(indices, self.vq.quantize.n_e, "train")
        self.log("train/aeloss", ae_loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/discloss", d_loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
        self.log_dict(logs, on_step=True, on_epoch=False)
        return ae_loss

    def step_schedulers(self) -> None:
        """Manual optimisation steps the LR schedules itself, once per training step (both schedules,
        also while the discriminator waits for disc_start, so its lr is the step's as in taming)."""
        schedulers = self.lr_schedulers()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            for scheduler in (
                schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []
            ):
                scheduler.step()

    def last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight: where taming's adaptive weight compares gradients."""
        return self.vq.decoder.conv_out.weight

    def training_step(self, batch: dict[str, Any] | None, batch_idx: int) -> torch.Tensor | None:
        if batch is None:  # every sample was skipped (data.on_error=skip): Lightning skips the step
            return None
        if self.loss is not None:
            return self.taming_step(batch, batch_idx)
        loss, logs = self.losses(batch, "train")
        check_finite(loss, self.global_step, batch_idx)
        self.log("train/loss", logs.pop("train/loss"), on_step=True, on_epoch=False, prog_bar=True)
        self.log_dict(logs, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: dict[str, Any] | None, batch_idx: int) -> None:
        if batch is None:  # every sample of the batch was skipped (data.on_error=skip)
            return
        if self.loss is not None:
            x = self.get_input(batch)
            reconstruction, codebook_loss, indices = self(x)
            ae_loss, logs = self.loss.generator_loss(
                codebook_loss, x, reconstruction, self.global_step, None, split="val"
            )
            _, d_logs = self.loss.discriminator_loss(x, reconstruction, self.global_step, split="val")
            logs |= d_logs | codebook_usage(indices, self.vq.quantize.n_e, "val")
            logs |= {"val/aeloss": ae_loss, "val/rec_l1": (reconstruction - x).abs().mean()}
        else:
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
        optimizer = build_optimizer(self.optimizer_factory, self.vq.parameters(), self.learning_rate)
        if self.loss is None:
            return optimizer_config(optimizer, self.lr_lambda)
        discriminator = build_optimizer(
            self.optimizer_factory, self.loss.discriminator.parameters(), self.learning_rate
        )
        configs = [optimizer_config(o, self.lr_lambda) for o in (optimizer, discriminator)]
        return configs if self.lr_lambda is not None else [optimizer, discriminator]

    def on_fit_start(self) -> None:
        # Lightning warns at every checkpoint of a manual-optimisation run that it holds the state after
        # the step: that is the state exact resume needs (the next step starts from it), not a problem.
        warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
        precision = str(getattr(self._trainer, "precision", "32"))
        if self.loss is not None and precision.startswith("16"):
            raise ValueError(
                f"trainer.precision={precision} with the taming loss: the discriminator's step does not go "
                "through fp16 loss scaling; use trainer.precision=bf16-mixed or 32-true"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["segldm"] = {"kind": self.checkpoint_kind, "config": self.segldm_config}


def codebook_usage(indices: torch.Tensor, n_embed: int, prefix: str) -> dict[str, torch.Tensor]:
    """Perplexity of the batch's code histogram and the number of distinct codes used."""
    counts = torch.bincount(indices.flatten(), minlength=n_embed).float()
    probs = counts / counts.sum()
    return {
        f"{prefix}/perplexity": torch.exp(-(probs * torch.log(probs + 1e-10)).sum()),
        f"{prefix}/codes_used": (counts > 0).sum().float(),
    }


def load_loss_weights(loss: VQLPIPSWithDiscriminator, path: str) -> None:
    """A taming/CompVis/segldm first-stage checkpoint's ``loss.*`` into ``loss``, strictly.

    Checkpoints without ``loss.*`` keys (an LDM's first stage, an L1-only run) leave it as built.
    With ``perceptual_weight: 0`` the checkpoint's LPIPS keys are not needed and are skipped; every
    other missing or unexpected key, or a shape mismatch, raises naming the file.
    """
    state = {k.removeprefix("loss."): v for k, v in read_state_dict(path).items() if k.startswith("loss.")}
    if not state:
        return
    if loss.perceptual_loss is None:
        state = {k: v for k, v in state.items() if not k.startswith("perceptual_loss.")}
    own = loss.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        details = []
        if missing:
            details.append(f"missing {missing[:4]}")
        if unexpected:
            details.append(f"unexpected {unexpected[:4]}")
        for key in mismatched[:4]:
            details.append(f"{key}: checkpoint {tuple(state[key].shape)} vs config {tuple(own[key].shape)}")
        raise CheckpointError(
            f"{path}: its loss.* keys do not fit model.loss (disc_num_layers, disc_ndf, use_actnorm, "
            "perceptual_weight): " + "; ".join(details)
        )
    loss.load_state_dict(state, strict=True)
