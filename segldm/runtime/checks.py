"""Start-up validation of a composed config, before any data is read or any model is built.

Interpolations keep the defaults consistent; these checks catch what a user can still break with
an override, and each message names both keys, both values and what would be consistent.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from segldm.condition import LabelCondition, as_condition
from segldm.config.resolvers import downsample_factor
from segldm.config.shapes import check_shapes
from segldm.diffusion.guidance import check_guidance_scale
from segldm.diffusion.objectives import objective_problems, zero_terminal_snr_problems
from segldm.diffusion.samplers import SamplerSettings, sampler_name_problem
from segldm.errors import StartupError
from segldm.models.discriminator import min_input_size
from segldm.models.first_stage_loss import GAN_LOSSES
from segldm.models.perceptual import PerceptualWeightsError, find_vgg16_weights, missing_weights_message
from segldm.runtime.preemption import parse_signals
from segldm.training.options import DiffusionOptions, option_problems


class ConfigError(StartupError):
    """A composed config that cannot train; the message says which keys disagree and how."""


class ConfigWarning(UserWarning):
    """A config that trains but risks failing later (e.g. little free disk space)."""


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest existing ancestor (what decides whether ``path`` can be created)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def unwritable(path: Path) -> str | None:
    """Why files cannot be created at ``path`` (None: they can), checked without writing anything."""
    probe = nearest_existing(path)
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable by this user"
    try:
        if os.statvfs(probe).f_flag & os.ST_RDONLY:
            return f"{probe} is on a read-only file system"
    except OSError:
        pass
    return None


def _output_problems(cfg: DictConfig, problems: list[str]) -> None:
    """Output root, run folder and checkpoint folder writable; free space warning (reliability.min_free_gb)."""
    folders = {"paths.output_root": cfg.paths.output_root}
    output_dir = OmegaConf.select(cfg, "paths.output_dir", default=None, throw_on_resolution_failure=False)
    if output_dir:
        folders["paths.output_dir"] = output_dir
    ckpt_dir = OmegaConf.select(
        cfg, "callbacks.model_checkpoint.dirpath", default=None, throw_on_resolution_failure=False
    )
    if ckpt_dir:
        folders["callbacks.model_checkpoint.dirpath"] = ckpt_dir
    for key, folder in folders.items():
        reason = unwritable(Path(folder))
        if reason:
            problems.append(
                f"{key}={folder} cannot be written ({reason}); choose a writable folder, e.g. paths.output_root=<dir>"
            )
            return
    min_free_gb = OmegaConf.select(cfg, "reliability.min_free_gb", default=None)
    if min_free_gb:
        probe = nearest_existing(Path(folders.get("paths.output_dir", cfg.paths.output_root)))
        free_gb = shutil.disk_usage(probe).free / 2**30
        if free_gb < float(min_free_gb):
            warnings.warn(
                f"only {free_gb:.1f} GiB free on the disk of {probe} (reliability.min_free_gb={min_free_gb}): "
                "checkpoints may fail to save later (the previous one is kept); free space or move paths.output_root",
                ConfigWarning,
                stacklevel=3,
            )


def _reliability_problems(cfg: DictConfig, problems: list[str]) -> None:
    """resume / ckpt_path / checkpoint_signals / logger on_unavailable values."""
    resume, ckpt_path = cfg.get("resume"), cfg.get("ckpt_path")
    if resume not in (None, "auto"):
        problems.append(f"resume={resume!r} is not a resume mode; use resume=auto (or leave it null)")
    elif resume == "auto" and ckpt_path not in (None, "last"):
        problems.append(
            f"resume=auto and ckpt_path={ckpt_path} are both set: resume=auto picks the newest checkpoint of this "
            "run's folder, ckpt_path names one; set only one"
        )
    signals = OmegaConf.select(cfg, "reliability.checkpoint_signals", default=None)
    try:
        parse_signals(signals)
    except ValueError as err:
        problems.append(str(err))
    for name, logger_cfg in (cfg.get("logger") or {}).items():
        on_unavailable = logger_cfg.get("on_unavailable") if isinstance(logger_cfg, DictConfig) else None
        if on_unavailable is not None and on_unavailable not in ("fail", "local"):
            problems.append(f"logger.{name}.on_unavailable={on_unavailable!r}; use fail or local")


def _sampler_step_problems(cfg: DictConfig) -> list[str]:
    """``model.sampler``'s keys, and the step counts of the model's sampler, the sample grids and the
    in-training metrics, each checked by the sampler that runs it (DDIM: CompVis's +1 shift keeps t
    inside the schedule) with the sampler's options (spacing, discretization)."""
    model = cfg.model
    try:
        settings = SamplerSettings.from_config(plain(model.get("sampler")))
    except ValueError as err:
        return [str(err)]
    runs = {"model.sampler.steps": (settings.name, settings.steps)}
    grid = OmegaConf.select(cfg, "callbacks.sample_grid", default=None)
    if isinstance(grid, DictConfig) and grid.get("ddim_steps") is not None:  # the grids use model.sampler
        runs["callbacks.sample_grid.ddim_steps"] = (settings.name, grid.ddim_steps)
    metrics = OmegaConf.select(cfg, "callbacks.generation_metrics", default=None)
    metrics_on = isinstance(metrics, DictConfig) and int(metrics.get("every_n_steps") or 0) > 0
    if metrics_on and metrics.get("steps") is not None:
        runs["callbacks.generation_metrics.steps"] = (metrics.get("sampler") or settings.name, metrics.steps)
    schedule = plain(model.get("diffusion"))  # diffusers: samplers build their scheduler from it
    problems: list[str] = []
    for key, (name, steps) in runs.items():
        if int(steps) <= 0 or sampler_name_problem(str(name)):
            continue  # reported as "must be positive" / "is not a sampler"
        try:
            settings.override(name=name, steps=int(steps)).build(schedule).check(
                int(diffusion_option(model, "timesteps")), key
            )
        except (ValueError, ModuleNotFoundError) as err:
            if str(err) not in problems:  # a bad option is the same problem at every key
                problems.append(str(err))
    return problems


def plain(node: Any) -> dict[str, Any]:
    """A config node as a plain dict (interpolations resolved; None: empty)."""
    if isinstance(node, DictConfig):
        return dict(OmegaConf.to_container(node, resolve=True))
    return dict(node or {})


def sampler_option(model: DictConfig, name: str) -> Any:
    """model.sampler.<name>, or SamplerSettings' default where the config leaves it out."""
    return OmegaConf.select(model, f"sampler.{name}", default=getattr(SamplerSettings(), name))


def diffusion_option(model: DictConfig, name: str) -> Any:
    """model.diffusion.<name>, or LatentDiffusion's default where the config leaves it out."""
    return OmegaConf.select(model, f"diffusion.{name}", default=getattr(DiffusionOptions(), name))


def _objective_problems(model: DictConfig) -> list[str]:
    """Parameterization and loss weighting the code knows, a positive min-SNR gamma, and what a
    zero-terminal-SNR schedule needs (v or x0, a sampler that supports it)."""
    return objective_problems(
        diffusion_option(model, "parameterization"),
        diffusion_option(model, "loss_weighting"),
        diffusion_option(model, "min_snr_gamma"),
    ) + zero_terminal_snr_problems(
        bool(diffusion_option(model, "zero_terminal_snr")),
        diffusion_option(model, "parameterization"),
        str(sampler_option(model, "name")),
    )


def _guidance_problems(cfg: DictConfig) -> list[str]:
    """Condition dropout in [0, 1); guidance scales >= 1, and > 1 only for a model trained with dropout."""
    model, problems = cfg.model, []
    drop = float(diffusion_option(model, "cond_drop_prob"))
    if not 0.0 <= drop < 1.0:
        problems.append(f"model.diffusion.cond_drop_prob={drop} must be in [0, 1) (0: no condition dropout)")
    scales = {"model.sampler.guidance_scale": sampler_option(model, "guidance_scale")}
    for name in ("sample_grid", "generation_metrics"):
        node = OmegaConf.select(cfg, f"callbacks.{name}", default=None)
        if isinstance(node, DictConfig) and node.get("guidance_scale") is not None:
            scales[f"callbacks.{name}.guidance_scale"] = node.guidance_scale
    for key, scale in scales.items():
        try:
            check_guidance_scale(float(scale), key)
        except ValueError as err:
            problems.append(str(err))
            continue
        if float(scale) != 1.0 and drop == 0.0:
            problems.append(
                f"{key}={scale} guides a model trained without condition dropout (model.diffusion.cond_drop_prob=0): "
                "set model.diffusion.cond_drop_prob>0 (e.g. 0.1) or the scale to 1"
            )
    return problems


def _first_stage_loss_problems(cfg: DictConfig, loss: DictConfig) -> list[str]:
    """The taming loss: a discriminator that fits the images, LPIPS weights that exist."""
    problems = []
    layers = int(loss.get("disc_num_layers", 3))
    if layers < 1:
        problems.append(f"model.loss.disc_num_layers={layers} must be >= 1")
    elif cfg.data.size < min_input_size(layers):
        fitting = max((n for n in range(1, layers) if cfg.data.size >= min_input_size(n)), default=None)
        problems.append(
            f"model.loss.disc_num_layers={layers}: the PatchGAN needs images of at least {min_input_size(layers)} px "
            f"but data.size={cfg.data.size}; use "
            + (f"model.loss.disc_num_layers={fitting} or " if fitting else "")
            + f"data.size>={min_input_size(layers)}"
        )
    if loss.get("disc_loss", "hinge") not in GAN_LOSSES:
        problems.append(f"model.loss.disc_loss={loss.get('disc_loss')!r}; use one of {list(GAN_LOSSES)}")
    if float(loss.get("perceptual_weight", 1.0)) > 0 and loss.get("perceptual_required", True):
        try:
            found = find_vgg16_weights(loss.get("vgg16_path"), loss.get("lpips_checkpoint"))
        except PerceptualWeightsError as err:
            problems.append(str(err))
        else:
            if found is None:
                problems.append(missing_weights_message())
    return problems


def _is_ldm(cfg: DictConfig) -> bool:
    return str(cfg.model.get("_target_", "")).endswith("LatentDiffusion")


def _cache_latents_problems(cfg: DictConfig) -> list[str]:
    """Cached latents need training samples that never change: no random crop, no flip."""
    if not OmegaConf.select(cfg, "model.performance.cache_latents", default=False):
        return []
    train = cfg.data.get("train")
    augmented = [
        f"data.train.{key}"
        for key in ("random_crop", "flip")
        if isinstance(train, DictConfig) and train.get(key)
    ]
    if not augmented:
        return []
    return [
        f"model.performance.cache_latents=true, but the training data changes its samples between epochs "
        f"({', '.join(f'{k}=true' for k in augmented)}): cached latents would be wrong. Set "
        f"model.performance.cache_latents=false, or turn the augmentations off: "
        + " ".join(f"{k}=false" for k in augmented)
    ]


def check_config_shapes(cfg: DictConfig) -> None:
    """Values whose type does not fit their key (segldm.config.shapes), before anything else reads them."""
    problems = check_shapes(cfg)
    if problems:
        raise ConfigError("config values of the wrong kind:\n  - " + "\n  - ".join(problems))


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError with every problem found, one per line."""
    check_config_shapes(cfg)
    problems: list[str] = []
    data, model = cfg.data, cfg.model
    first = model.first_stage
    factor = downsample_factor(first.ddconfig.ch_mult)
    if data.size % factor:
        # suggest sizes every later check accepts too (the LDM's UNet halves the latent again)
        multiple = factor * (2 ** (len(model.unet.channel_mult) - 1) if _is_ldm(cfg) else 1)
        lower, upper = data.size - data.size % multiple, data.size - data.size % multiple + multiple
        problems.append(
            f"data.size={data.size} is not divisible by the first stage's downsampling factor {factor} "
            f"(model.first_stage.ddconfig.ch_mult={list(first.ddconfig.ch_mult)}); use e.g. "
            f"{f'{lower} or ' if lower else ''}{upper}"
        )
    if data.batch_size <= 0:
        problems.append(f"data.batch_size={data.batch_size} must be positive")
    if data.get("val_batch_size") is not None and data.val_batch_size <= 0:
        problems.append(
            f"data.val_batch_size={data.val_batch_size} must be positive (or null: data.batch_size)"
        )
    problems += option_problems(model)
    problems += _cache_latents_problems(cfg)
    base_lr = OmegaConf.select(model, "optimization.base_learning_rate", default=None)
    if base_lr is not None and base_lr <= 0:
        problems.append(f"model.optimization.base_learning_rate={base_lr} must be positive")

    if _is_ldm(cfg):
        cond = model.cond_stage
        # a CompVis-translated or older config has no model.condition: the data's labels are its condition
        condition = as_condition(model.get("condition"), LabelCondition.from_data(data))
        problems += condition.config_problems(cond.in_channels)
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
        never = sorted(r for r in model.unet.attention_resolutions if r <= 0 or r & (r - 1))
        if never:
            problems.append(
                f"model.unet.attention_resolutions={list(model.unet.attention_resolutions)}: {never} can never "
                "match a UNet level (CompVis compares each entry with the downsampling factor 1, 2, 4, ...; this "
                f"UNet with channel_mult={list(model.unet.channel_mult)} has {sorted(reachable)}); use powers of two"
            )
        unused = sorted(r for r in set(model.unet.attention_resolutions) - reachable if r not in never)
        if unused and set(model.unet.attention_resolutions) & reachable:
            problems.append(
                f"model.unet.attention_resolutions={list(model.unet.attention_resolutions)}: {unused} are not "
                f"downsampling factors of this UNet (it has {sorted(reachable)}; CompVis compares the list with "
                "the factor, not with the pixel size)"
            )
        steps, name = sampler_option(model, "steps"), str(sampler_option(model, "name"))
        if steps <= 0:
            problems.append(f"model.sampler.steps={steps} must be positive")
        name_problem = sampler_name_problem(name)
        if name_problem:
            problems.append(f"model.sampler.name={name!r} {name_problem}")
        problems += _sampler_step_problems(cfg)
        problems += _guidance_problems(cfg)
        problems += _objective_problems(model)
        unet_factor = 2 ** (len(model.unet.channel_mult) - 1)
        if latent % unet_factor:
            multiple = factor * unet_factor
            lower, upper = data.size - data.size % multiple, data.size - data.size % multiple + multiple
            problems.append(
                f"data.size={data.size} gives a {latent}px latent (first-stage factor {factor}), which the UNet "
                f"cannot halve {len(model.unet.channel_mult) - 1} times (model.unet.channel_mult="
                f"{list(model.unet.channel_mult)}: its skip connections would not align); use a data.size "
                f"divisible by {multiple}, e.g. {lower or multiple} or {upper}"
            )
        if model.get("scale_by_std") and float(model.get("scale_factor", 1.0)) != 1.0:
            problems.append(
                f"model.scale_by_std=true and model.scale_factor={model.scale_factor}: scale_by_std sets the factor "
                "from the first batch (CompVis asserts scale_factor == 1 with it); set model.scale_factor=1.0, or "
                "model.scale_by_std=false to keep your factor"
            )
        ckpt = first.get("ckpt_path")
        if ckpt is not None and not Path(ckpt).exists():  # a file, or a diffusers VQModel folder
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

    loss = model.get("loss")
    if isinstance(loss, DictConfig) and "_target_" not in loss:
        problems.append(
            f"model.loss has settings ({', '.join(sorted(loss))}) but no _target_: values set for one loss "
            "were left over after another was chosen (model/loss=...); choose the loss in the preset's "
            "defaults list or drop those keys"
        )
    if isinstance(loss, DictConfig) and str(loss.get("_target_", "")).endswith("VQLPIPSWithDiscriminator"):
        problems += _first_stage_loss_problems(cfg, loss)

    _output_problems(cfg, problems)
    _reliability_problems(cfg, problems)

    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
