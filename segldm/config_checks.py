"""Start-up validation of a composed config, before any data is read or any model is built.

Interpolations keep the defaults consistent; these checks catch what a user can still break with
an override, and each message names both keys, both values and what would be consistent.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

from segldm.config import downsample_factor
from segldm.diffusion import SAMPLER_NAMES


class ConfigError(ValueError):
    """A composed config that cannot train; the message says which keys disagree and how."""


def _is_ldm(cfg: DictConfig) -> bool:
    return str(cfg.model.get("_target_", "")).endswith("LatentDiffusion")


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError with every problem found, one per line."""
    problems: list[str] = []
    data, model = cfg.data, cfg.model
    first = model.first_stage
    factor = downsample_factor(first.ddconfig.ch_mult)
    if data.size % factor:
        lower, upper = data.size - data.size % factor, data.size - data.size % factor + factor
        problems.append(
            f"data.size={data.size} is not divisible by the first stage's downsampling factor {factor} "
            f"(model.first_stage.ddconfig.ch_mult={list(first.ddconfig.ch_mult)}); use e.g. {lower} or {upper}"
        )
    if data.batch_size <= 0:
        problems.append(f"data.batch_size={data.batch_size} must be positive")
    if model.base_learning_rate <= 0:
        problems.append(f"model.base_learning_rate={model.base_learning_rate} must be positive")

    if _is_ldm(cfg):
        cond = model.cond_stage
        if cond.in_channels != data.n_labels:
            problems.append(
                f"model.cond_stage.in_channels={cond.in_channels} but data.n_labels={data.n_labels}: "
                "the cond stage reads one channel per label; set them equal"
            )
        latent = data.size // factor
        cond_size = data.size
        for _ in range(cond.n_stages):
            cond_size = int(cond_size * cond.multiplier)
        if cond_size != latent:
            problems.append(
                f"model.cond_stage maps {data.size}px masks to {cond_size}px (n_stages={cond.n_stages}, "
                f"multiplier={cond.multiplier}) but the latent is {latent}px (data.size={data.size} / "
                f"first-stage factor {factor}); for multiplier 0.5 use n_stages={factor.bit_length() - 1}"
            )
        if model.channels != first.embed_dim:
            problems.append(
                f"model.channels={model.channels} but model.first_stage.embed_dim={first.embed_dim}: "
                "the diffusion runs on the first stage's latent"
            )
        cond_channels = cond.out_channels if cond.get("out_channels") is not None else cond.in_channels
        expected_in = model.channels + cond_channels
        if model.unet.in_channels != expected_in:
            problems.append(
                f"model.unet.in_channels={model.unet.in_channels} but concat conditioning gives "
                f"model.channels ({model.channels}) + model.cond_stage.out_channels ({cond_channels}) = {expected_in}"
            )
        if model.unet.out_channels != model.channels:
            problems.append(
                f"model.unet.out_channels={model.unet.out_channels} but model.channels={model.channels}: "
                "the UNet predicts noise of the latent's shape"
            )
        n_levels = len(model.unet.channel_mult)
        reachable = {2**level for level in range(n_levels)}
        unused = sorted(set(model.unet.attention_resolutions) - reachable)
        if unused and set(model.unet.attention_resolutions) & reachable:
            problems.append(
                f"model.unet.attention_resolutions={list(model.unet.attention_resolutions)}: {unused} are not "
                f"downsampling factors of this UNet (it has {sorted(reachable)}; CompVis compares the list with "
                "the factor, not with the pixel size)"
            )
        sampler = model.get("sampler", {})
        if sampler.get("steps", 1) <= 0:
            problems.append(f"model.sampler.steps={sampler.get('steps')} must be positive")
        if sampler.get("name", "ddim") not in SAMPLER_NAMES:
            problems.append(
                f"model.sampler.name={sampler.get('name')!r} is not a sampler; use one of {list(SAMPLER_NAMES)}"
            )
        ckpt = first.get("ckpt_path")
        if ckpt is not None and not Path(ckpt).is_file():
            problems.append(
                f"model.first_stage.ckpt_path={ckpt} does not exist. Train a first stage with "
                "`python -m segldm.train model=autoencoder` (or `make train`), or download CompVis's vq-f4 "
                "(https://ommer-lab.com/files/latent-diffusion/vq-f4.zip) to models/first_stage_models/vq-f4/"
            )
        if ckpt is None and model.get("require_pretrained_first_stage", True):
            problems.append(
                "model.first_stage.ckpt_path is null: the LDM needs a trained first stage (train one with "
                "`python -m segldm.train model=autoencoder`), or set model.require_pretrained_first_stage=false "
                "for smoke tests"
            )

    output_root = Path(cfg.paths.output_root)
    probe = output_root if output_root.exists() else output_root.parent
    if probe.exists() and not os.access(probe, os.W_OK):
        problems.append(f"paths.output_root={output_root} is not writable")

    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
