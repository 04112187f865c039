"""The first stage's training loss as taming-transformers trains CompVis's VQ-f4.

``VQLPIPSWithDiscriminator``: L1 reconstruction + LPIPS perceptual loss + PatchGAN adversarial loss
with taming's adaptive weight, plus the codebook loss. Attribute names are taming's
(``perceptual_loss``, ``discriminator``), so held by the training module as ``loss`` its state_dict
keys are a taming/CompVis VQ checkpoint's ``loss.*``. The math is in small functions below.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segldm.config.construction import constructor_arguments
from segldm.models.discriminator import NLayerDiscriminator, depth_problem, image_size_problem, weights_init
from segldm.models.perceptual import (
    LPIPS,
    PerceptualWeightsError,
    find_vgg16_weights,
    missing_weights_message,
    require_vgg16_weights,
)

GAN_LOSSES = ("hinge", "vanilla")


def disc_loss_problem(disc_loss: str, key: str = "model.loss.disc_loss") -> str | None:
    """Why ``disc_loss`` is no GAN loss this module has, or None."""
    return f"{key}={disc_loss!r}; use one of {list(GAN_LOSSES)}" if disc_loss not in GAN_LOSSES else None


def disc_conditional_problem(disc_conditional: bool, key: str = "model.loss.disc_conditional") -> str | None:
    """taming's conditional discriminator is not ported: the VQ-f4 recipe is unconditional."""
    if not disc_conditional:
        return None
    return f"{key}=true is not supported (the VQ-f4 recipe is unconditional)"


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 (E[relu(1 - D(x))] + E[relu(1 + D(x_rec))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 (E[softplus(-D(x))] + E[softplus(D(x_rec))]): the non-saturating GAN's discriminator loss."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``weight`` from step ``threshold`` on, ``value`` before (taming's disc_start switch)."""
    return value if global_step < threshold else weight


def adaptive_weight(
    nll_grads: torch.Tensor, g_grads: torch.Tensor, disc_weight: float = 1.0, max_weight: float = 1e4
) -> torch.Tensor:
    """taming's balance: ||grad nll|| / (||grad g|| + 1e-4), clamped to [0, 1e4], times disc_weight,
    both gradients taken at the decoder's last layer."""
    weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(weight, 0.0, max_weight).detach() * disc_weight


class VQLPIPSWithDiscriminator(nn.Module):
    """taming's ``VQLPIPSWithDiscriminator`` (same arguments, same terms, same logged names).

    ``perceptual_weight: 0`` builds no LPIPS network (fully offline); ``vgg16_path`` and
    ``lpips_checkpoint`` say where its backbone may come from (``segldm.models.perceptual``).
    """

    def __init__(
        self,
        disc_start: int,
        codebook_weight: float = 1.0,
        pixelloss_weight: float = 1.0,
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_factor: float = 1.0,
        disc_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        use_actnorm: bool = False,
        disc_conditional: bool = False,
        disc_ndf: int = 64,
        disc_loss: str = "hinge",
        vgg16_path: str | Path | None = None,
        lpips_checkpoint: str | Path | None = None,
        perceptual_dropout: bool = True,
        discriminator_before_start: bool = False,
        perceptual_required: bool = True,
    ) -> None:
        super().__init__()
        problems = [
            p for p in (disc_loss_problem(disc_loss), disc_conditional_problem(disc_conditional)) if p
        ]
        if problems:
            raise ValueError("; ".join(problems))
        if (
            perceptual_weight > 0
            and not perceptual_required
            and find_vgg16_weights(vgg16_path, lpips_checkpoint) is None
        ):
            warnings.warn(
                "no VGG16 weights for LPIPS (model.loss.perceptual_required=false): training without the "
                "perceptual term. " + missing_weights_message(),
                UserWarning,
                stacklevel=2,
            )
            perceptual_weight = 0.0
        self.codebook_weight = codebook_weight
        self.pixel_weight = pixelloss_weight
        self.perceptual_weight = perceptual_weight
        self.perceptual_loss = (
            LPIPS(vgg16_path, lpips_checkpoint, perceptual_dropout) if perceptual_weight > 0 else None
        )
        self.discriminator = NLayerDiscriminator(
            input_nc=disc_in_channels, n_layers=disc_num_layers, use_actnorm=use_actnorm, ndf=disc_ndf
        ).apply(weights_init)
        self.discriminator_iter_start = disc_start
        self.disc_loss = hinge_d_loss if disc_loss == "hinge" else vanilla_d_loss
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight
        # taming runs the discriminator (forward, adaptive weight, its own step) also before disc_start,
        # where every GAN term is multiplied by 0; skipping it leaves the autoencoder's update unchanged
        self.discriminator_before_start = discriminator_before_start

    @classmethod
    def startup_problems(cls, config: Mapping[str, Any], key: str) -> list[str]:
        """This config's problems before anything is built: the GAN loss, the discriminator's depth and
        LPIPS weights that exist (what the constructor would refuse, without reading any weights)."""
        arguments = constructor_arguments(cls, config)
        problems = [
            disc_loss_problem(arguments["disc_loss"], f"{key}.disc_loss"),
            disc_conditional_problem(arguments["disc_conditional"], f"{key}.disc_conditional"),
            depth_problem(int(arguments["disc_num_layers"]), f"{key}.disc_num_layers"),
        ]
        if float(arguments["perceptual_weight"]) > 0:
            vgg16_path, checkpoint = arguments["vgg16_path"], arguments["lpips_checkpoint"]
            try:
                if arguments["perceptual_required"]:
                    require_vgg16_weights(vgg16_path, checkpoint, key)
                else:  # without weights it trains without the term; a named file must still exist
                    find_vgg16_weights(vgg16_path, checkpoint, f"{key}.vgg16_path")
            except PerceptualWeightsError as err:
                problems.append(str(err))
        return [problem for problem in problems if problem]

    @classmethod
    def image_size_problems(cls, config: Mapping[str, Any], key: str, size: int) -> list[str]:
        """Whether the discriminator's patches fit ``size`` px images (``data.size``)."""
        layers = int(constructor_arguments(cls, config)["disc_num_layers"])
        problem = image_size_problem(layers, size, f"{key}.disc_num_layers")
        return [problem] if problem else []

    def reconstruction_terms(
        self, inputs: torch.Tensor, reconstructions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(nll_loss, rec_loss map, p_loss): mean of |x - x_rec| + perceptual_weight * LPIPS."""
        rec_loss = torch.abs(inputs.contiguous() - reconstructions.contiguous())
        if self.perceptual_loss is not None:
            p_loss = self.perceptual_loss(inputs.contiguous(), reconstructions.contiguous())
            rec_loss = rec_loss + self.perceptual_weight * p_loss
        else:
            p_loss = torch.zeros((), device=inputs.device)
        return rec_loss.mean(), rec_loss, p_loss

    def generator_loss(
        self,
        codebook_loss: torch.Tensor,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        global_step: int,
        last_layer: torch.Tensor | None,
        split: str = "train",
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The autoencoder's loss (taming's optimizer_idx 0). Without `last_layer` (validation) the
        adaptive weight is 0, as taming's fallback outside training."""
        nll_loss, rec_loss, p_loss = self.reconstruction_terms(inputs, reconstructions)
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        if not self.discriminator_active(global_step):
            g_loss = torch.zeros((), device=inputs.device)
            d_weight = torch.zeros((), device=inputs.device)
        elif last_layer is not None and torch.is_grad_enabled():
            g_loss = -torch.mean(self.discriminator(reconstructions.contiguous()))
            nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
            g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
            d_weight = adaptive_weight(nll_grads, g_grads, self.discriminator_weight)
        else:
            g_loss = -torch.mean(self.discriminator(reconstructions.contiguous()))
            d_weight = torch.zeros((), device=inputs.device)
        loss = nll_loss + d_weight * disc_factor * g_loss + self.codebook_weight * codebook_loss.mean()
        logs = {
            f"{split}/total_loss": loss.detach(),
            f"{split}/quant_loss": codebook_loss.detach().mean(),
            f"{split}/nll_loss": nll_loss.detach(),
            f"{split}/rec_loss": rec_loss.detach().mean(),
            f"{split}/p_loss": p_loss.detach().mean(),
            f"{split}/d_weight": d_weight.detach(),
            f"{split}/disc_factor": torch.tensor(float(disc_factor)),
            f"{split}/g_loss": g_loss.detach(),
        }
        return loss, logs

    def discriminator_active(self, global_step: int) -> bool:
        """Whether the GAN terms are computed at this step (always with discriminator_before_start)."""
        if self.discriminator_before_start:
            return True
        return adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start) != 0

    def discriminator_loss(
        self, inputs: torch.Tensor, reconstructions: torch.Tensor, global_step: int, split: str = "train"
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The discriminator's loss (taming's optimizer_idx 1), on detached images."""
        logits_real = self.discriminator(inputs.contiguous().detach())
        logits_fake = self.discriminator(reconstructions.contiguous().detach())
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        logs = {
            f"{split}/disc_loss": d_loss.detach(),
            f"{split}/logits_real": logits_real.detach().mean(),
            f"{split}/logits_fake": logits_fake.detach().mean(),
        }
        return d_loss, logs
