"""Start-up validation of a composed config, before any data is read or any model is built.

Each configured component checks its own config: this module imports the class each `_target_`
names (``data``, ``model`` and the model's parts, ``model.<part>``, ``scheduler``) and asks it
(:class:`Component`). What stays here spans components: the image size against the first stage's
downsampling and the backbone's size multiple, the condition's labels and the latent's channels
against the cond stage's and the backbone's, the sampling callbacks against the model's sampler,
cached latents against augmented data, and the run's folders and reliability settings.
Interpolations keep the defaults consistent; these checks catch what a user can still break with
an override, and each message names both keys, both values and what would be consistent.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from segldm.condition import LabelCondition, as_condition
from segldm.config.shapes import check_shapes
from segldm.errors import StartupError
from segldm.runtime.preemption import parse_signals


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


def plain(node: Any) -> dict[str, Any]:
    """A config node as a plain dict (interpolations resolved; None: empty)."""
    if isinstance(node, DictConfig):
        return dict(OmegaConf.to_container(node, resolve=True))
    return dict(node or {})


@dataclass(frozen=True)
class Component:
    """A configured class and its config (``key``: where it is, e.g. ``model.unet``), asked by name.

    Each question is an optional classmethod ``(config, key, *args)`` of the class; a class that
    does not have it answers None (the rules that need the answer are skipped):

    - ``startup_problems()``: its own config's problems (every component);
    - ``config_downsample_factor()``: (factor, the setting that gives it) (the first stage);
    - ``config_latent_channels()``: (channels, the setting) (the first stage);
    - ``config_size_multiple()``: (what its input sides must be a multiple of, why) (the backbone);
    - ``config_channels()``: (channels in, channels out) (the cond stage, the backbone);
    - ``output_side_problems(side, target, why)``: maps ``side`` px to ``target`` px? (the cond stage);
    - ``image_size_problems(size)``: fits ``data.size`` px images? (any part that sees them);
    - ``sampling_problems(runs, guidance_scales)``: the sampling callbacks ask of the model.
    """

    key: str
    cls: Any  # a class, or the function a ``_target_`` may name (it answers nothing)
    config: dict[str, Any]

    def ask(self, question: str, *args: Any) -> Any:
        if question not in QUESTIONS:  # a misspelt question would be skipped silently
            raise ValueError(f"{question!r} is not a start-up question; the questions are {QUESTIONS}")
        method = getattr(self.cls, question, None)
        return None if method is None else method(self.config, self.key, *args)


QUESTIONS = (
    "startup_problems",
    "config_downsample_factor",
    "config_latent_channels",
    "config_size_multiple",
    "config_channels",
    "output_side_problems",
    "image_size_problems",
    "sampling_problems",
)
# the model's parts the cross-component rules compare, by config key (LatentDiffusion's arguments)
FIRST_STAGE, COND_STAGE, BACKBONE = "model.first_stage", "model.cond_stage", "model.unet"


def import_target(path: str) -> Any:
    """The class (or function) a ``_target_`` names, what instantiate will call, without Hydra's error
    log line: the start-up error names the key instead."""
    hydra_log = logging.getLogger("hydra.utils")
    disabled, hydra_log.disabled = hydra_log.disabled, True
    try:
        return get_object(path)
    finally:
        hydra_log.disabled = disabled


def configured_components(cfg: DictConfig) -> tuple[dict[str, Component], list[str]]:
    """``data``, ``model``, ``scheduler`` and each of the model's parts that names a ``_target_``, by key; a
    ``_target_`` that cannot be imported is a problem."""
    nodes = {"data": cfg.get("data"), "model": cfg.get("model"), "scheduler": cfg.get("scheduler")}
    model = cfg.get("model")
    if isinstance(model, DictConfig):
        nodes.update({f"model.{name}": node for name, node in model.items() if isinstance(node, DictConfig)})
    components, problems = {}, []
    for key, node in nodes.items():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        try:
            cls = import_target(str(node._target_))
        except Exception as err:  # Hydra's import errors: ImportError, ValueError, AttributeError, ...
            reason = " ".join(str(err).split())
            problems.append(
                f"{key}._target_={node._target_} cannot be imported ({reason}); fix the class path"
            )
            continue
        components[key] = Component(key, cls, plain(node))
    return components, problems


def _size_problems(size: int, components: dict[str, Component]) -> list[str]:
    """data.size against the first stage's downsampling factor, the backbone's size multiple (on the
    latent), the cond stage's output side and every part that sees the images."""
    problems: list[str] = []
    first, backbone = components.get(FIRST_STAGE), components.get(BACKBONE)
    factor, factor_why = (first and first.ask("config_downsample_factor")) or (1, "")
    multiple, multiple_why = (backbone and backbone.ask("config_size_multiple")) or (1, "")
    step = factor * multiple  # suggested sizes pass both rules
    lower, upper = size - size % step, size - size % step + step
    if size % factor:
        problems.append(
            f"data.size={size} is not divisible by the first stage's downsampling factor {factor} ({factor_why}); "
            f"use e.g. {f'{lower} or ' if lower else ''}{upper}"
        )
    latent = size // factor
    if latent % multiple:
        problems.append(
            f"data.size={size} gives a {latent}px latent (first-stage factor {factor}), which is no multiple of "
            f"{multiple} ({multiple_why}); use a data.size divisible by {step}, e.g. {lower or step} or {upper}"
        )
    cond = components.get(COND_STAGE)
    if cond is not None:
        why = f"the latent is {latent}px (data.size={size} / first-stage factor {factor})"
        problems += cond.ask("output_side_problems", size, latent, why) or []
    for component in components.values():
        problems += component.ask("image_size_problems", size) or []
    return problems


def _channel_problems(cfg: DictConfig, components: dict[str, Component]) -> list[str]:
    """The condition's labels against the cond stage's input, and concat conditioning's channels:
    backbone in = latent + cond stage out, backbone out = latent = the first stage's latent."""
    cond, backbone = components.get(COND_STAGE), components.get(BACKBONE)
    first = components.get(FIRST_STAGE)
    problems: list[str] = []
    cond_channels = cond.ask("config_channels") if cond else None
    if cond_channels is not None:
        # a CompVis-translated or older config has no model.condition: the data's labels are its condition
        condition = as_condition(
            plain(cfg.model.get("condition")) or None, LabelCondition.from_data(cfg.data)
        )
        problems += condition.config_problems(cond_channels[0])
    latent_channels = first.ask("config_latent_channels") if first and backbone else None
    channels = cfg.model.get("channels")
    if latent_channels is not None and channels != latent_channels[0]:
        problems.append(
            f"model.channels={channels} but {latent_channels[1]}: the diffusion runs on the first stage's latent"
        )
    backbone_channels = backbone.ask("config_channels") if backbone else None
    if backbone_channels is not None and cond_channels is not None:
        expected_in = channels + cond_channels[1]
        if backbone_channels[0] != expected_in:
            problems.append(
                f"{backbone.key}.in_channels={backbone_channels[0]} but concat conditioning gives model.channels "
                f"({channels}) + {cond.key}.out_channels ({cond_channels[1]}) = {expected_in}"
            )
    if backbone_channels is not None and backbone_channels[1] != channels:
        problems.append(
            f"{backbone.key}.out_channels={backbone_channels[1]} but model.channels={channels}: the backbone "
            "predicts noise of the latent's shape"
        )
    return problems


def _callback_sampling_problems(cfg: DictConfig, model: Component | None) -> list[str]:
    """What the sample grids and in-training metrics ask of the model's sampler: their step counts
    and guidance scales (null: model.sampler's), checked by the model class."""
    if model is None:
        return []
    runs: dict[str, tuple[str, str | None, int]] = {}
    grid = OmegaConf.select(cfg, "callbacks.sample_grid", default=None)
    if isinstance(grid, DictConfig) and grid.get("ddim_steps") is not None:  # the grids use model.sampler
        runs["callbacks.sample_grid.ddim_steps"] = ("model.sampler.name", None, int(grid.ddim_steps))
    metrics = OmegaConf.select(cfg, "callbacks.generation_metrics", default=None)
    metrics_on = isinstance(metrics, DictConfig) and int(metrics.get("every_n_steps") or 0) > 0
    if metrics_on and metrics.get("steps") is not None:
        name = metrics.get("sampler")
        name_key = "model.sampler.name" if name is None else "callbacks.generation_metrics.sampler"
        runs["callbacks.generation_metrics.steps"] = (name_key, name, int(metrics.steps))
    scales = {}
    for callback in ("sample_grid", "generation_metrics"):
        node = OmegaConf.select(cfg, f"callbacks.{callback}", default=None)
        if isinstance(node, DictConfig) and node.get("guidance_scale") is not None:
            scales[f"callbacks.{callback}.guidance_scale"] = float(node.guidance_scale)
    if not runs and not scales:
        return []
    return model.ask("sampling_problems", runs, scales) or []


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
    components, problems = configured_components(cfg)
    problems += _size_problems(int(cfg.data.size), components)
    for component in components.values():
        problems += component.ask("startup_problems") or []
    problems += _channel_problems(cfg, components)
    problems += _callback_sampling_problems(cfg, components.get("model"))
    problems += _cache_latents_problems(cfg)
    _output_problems(cfg, problems)
    _reliability_problems(cfg, problems)
    if problems:
        unique = list(dict.fromkeys(problems))  # one bad sampler option is the same problem at every key
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(unique))
