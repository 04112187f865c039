"""LDM checkpoints in and out of models: rebuild from the stored config, strict load, init_from.

Files are read by :mod:`segldm.storage.checkpoint_files` (never running code from them). A native segldm LDM checkpoint is ``{"state_dict", "global_step",
"segldm": {"kind": "ldm", "config": <resolved run config>}}`` (what ``segldm.train`` writes through
``LatentDiffusion.on_save_checkpoint`` and what ``segldm.convert compvis`` writes); :func:`load_ldm`
rebuilds the model from that config and loads the weights strictly.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

import segldm  # noqa: F401  (resolvers, in case a stored config still holds interpolations)
from segldm.storage.checkpoint_files import (
    EMA_PREFIX,
    CheckpointError,
    CheckpointWarning,
    checkpoint_kind,
    load_strict,
    read_checkpoint,
    reconcile_ema,
    split_ema,
    state_dict_of,
    wrong_kind,
)
from segldm.training.ldm import LatentDiffusion
from segldm.training.options import group_flat_options

# Classes that moved when the package took its layered shape (docs/architecture.md): configs stored in
# checkpoints written before still name the old paths, and keep loading.
MOVED_TARGETS = {
    "segldm.models.ldm.LatentDiffusion": "segldm.training.ldm.LatentDiffusion",
    "segldm.models.autoencoder_training.VQAutoencoderModule": "segldm.training.autoencoder.VQAutoencoderModule",
    "segldm.lr_schedulers.LambdaLinearScheduler": "segldm.training.lr_schedulers.LambdaLinearScheduler",
    "segldm.lr_schedulers.CosineScheduler": "segldm.training.lr_schedulers.CosineScheduler",
    "segldm.lr_schedulers.ConstantScheduler": "segldm.training.lr_schedulers.ConstantScheduler",
}
SCHEDULE_CONFIG_KEYS = (
    "model.diffusion.timesteps, beta_schedule, linear_start, linear_end, cosine_s, v_posterior"
)


def check_schedule(model: LatentDiffusion, state_dict: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """The checkpoint's schedule buffers must be those of the config (else the config is not this model's)."""
    own = model.state_dict()
    bad = [
        name
        for name in ("betas", "alphas_cumprod", "posterior_variance")
        if name in state_dict
        and name in own
        and (
            state_dict[name].shape != own[name].shape
            or not torch.allclose(state_dict[name].double(), own[name].double(), rtol=1e-5, atol=1e-8)
        )
    ]
    if bad:
        raise CheckpointError(
            f"{path}: the noise schedule buffers {bad} differ from the ones the config gives "
            f"({SCHEDULE_CONFIG_KEYS}: {model.num_timesteps} steps); the config does not belong to this "
            "checkpoint. Use the config the checkpoint was trained with."
        )


def build_ldm(model_config: Mapping[str, Any]) -> LatentDiffusion:
    """Instantiate a LatentDiffusion from a Hydra model config, with no first-stage file needed.

    The weights come from the LDM checkpoint afterwards, so ``first_stage.ckpt_path`` is cleared
    and ``require_pretrained_first_stage`` is off.
    """

    cfg = OmegaConf.create(dict(model_config))
    cfg.first_stage.ckpt_path = None
    cfg.require_pretrained_first_stage = False
    model = instantiate(cfg)
    if not isinstance(model, LatentDiffusion):
        raise CheckpointError(f"model config builds {type(model).__name__}, not a LatentDiffusion")
    return model


def upgrade_targets(node: Any) -> Any:
    """A stored config with every ``_target_`` that names a moved class replaced by its current path."""
    if isinstance(node, Mapping):
        return {
            k: MOVED_TARGETS.get(v, v) if k == "_target_" and isinstance(v, str) else upgrade_targets(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [upgrade_targets(v) for v in node]
    return node


def ldm_config_of(checkpoint: Mapping[str, Any], path: str | Path) -> dict[str, Any]:
    """The resolved run config stored in a native segldm LDM checkpoint (checked to have ``model``)."""
    kind = checkpoint_kind(checkpoint)
    if kind == "compvis-ldm":
        raise wrong_kind(
            path,
            kind,
            "a segldm LDM checkpoint",
            f"Convert it first: python -m segldm.convert compvis --config <its config.yaml> --ckpt {path} "
            "--out <dir>, or load it directly with segldm.compat.compvis.load_compvis(<config.yaml>, path) "
            "(segldm.sample: compvis_config=<config.yaml>).",
        )
    if kind != "segldm-ldm":
        raise wrong_kind(
            path,
            kind,
            "a segldm LDM checkpoint",
            "Pass an LDM checkpoint (outputs/<run>/checkpoints/last.ckpt of a model=ldm_seg run, or "
            "<dir>/model.ckpt written by segldm.convert compvis); a first-stage file belongs in "
            "model.first_stage.ckpt_path.",
        )
    config = checkpoint["segldm"].get("config")
    if not isinstance(config, Mapping) or not isinstance(config.get("model"), Mapping):
        raise CheckpointError(
            f"{path}: its segldm section has no config with a 'model' entry (written by an old segldm, or "
            "by a model whose segldm_config was never set); it cannot be rebuilt from the file alone"
        )
    upgraded = upgrade_targets(dict(config))
    upgraded["model"] = group_flat_options(upgraded["model"])  # checkpoints from before the option groups
    return upgraded


def ldm_from_checkpoint(
    checkpoint: Mapping[str, Any], path: str | Path, device: str | torch.device = "cpu"
) -> LatentDiffusion:
    """Rebuild and strictly load the LDM of an already read native checkpoint (eval mode)."""
    config = ldm_config_of(checkpoint, path)
    state_dict = state_dict_of(checkpoint, path, "LDM checkpoint")
    model_config = dict(config["model"])
    use_ema, state_dict = reconcile_ema(
        bool(model_config.get("use_ema", True)), state_dict, path, "model.use_ema"
    )
    model_config["use_ema"] = use_ema
    model = build_ldm(model_config)
    check_schedule(model, state_dict, path)
    load_strict(model, state_dict, path, "the model its own config builds (segldm.config.model)")
    model.segldm_config = {**config, "model": {**config["model"], "use_ema": use_ema}}
    return model.to(device).eval()


def load_ldm(
    path: str | Path, trust_checkpoint: bool = False, device: str | torch.device = "cpu"
) -> LatentDiffusion:
    """A native segldm LDM checkpoint (training run or converted CompVis model) -> LatentDiffusion in eval mode."""
    checkpoint = read_checkpoint(path, what="LDM checkpoint", trust_checkpoint=trust_checkpoint)
    return ldm_from_checkpoint(checkpoint, path, device)


def ldm_checkpoint(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], global_step: int = 0, **extra: Any
) -> dict[str, Any]:
    """A native segldm LDM checkpoint dict (loadable by :func:`load_ldm` with weights_only)."""
    return {
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "global_step": int(global_step),
        "epoch": 0,
        "segldm": {"kind": "ldm", "config": dict(config)},
        **extra,
    }


def init_from_checkpoint(model: nn.Module, path: str | Path, trust_checkpoint: bool = False) -> None:
    """Start training from the weights of an LDM checkpoint (fresh optimizer, step 0): ``init_from``.

    The run's config must build the same architecture: every missing/unexpected key or shape is
    named. EMA follows :func:`reconcile_ema` (a checkpoint without shadows starts them from the
    loaded weights). ``scale_by_std`` keeps the checkpoint's scale factor, as CompVis does when it
    restarts from a checkpoint.
    """
    if not isinstance(model, LatentDiffusion):
        raise CheckpointError(
            f"init_from={path} needs model=ldm_seg (got {type(model).__name__}); to start a first stage "
            "from weights use model.first_stage.ckpt_path"
        )
    checkpoint = read_checkpoint(path, what="init_from checkpoint", trust_checkpoint=trust_checkpoint)
    kind = checkpoint_kind(checkpoint)
    if kind not in ("segldm-ldm", "compvis-ldm"):
        raise wrong_kind(
            path,
            kind,
            "an LDM checkpoint for init_from",
            "Pass a segldm LDM checkpoint or <dir>/model.ckpt from segldm.convert compvis; a first-stage "
            "file belongs in model.first_stage.ckpt_path.",
        )
    state_dict = state_dict_of(checkpoint, path, "init_from checkpoint")
    stored = group_flat_options(((checkpoint.get("segldm") or {}).get("config") or {}).get("model") or {})
    trained_as = (
        (stored.get("diffusion") or {}).get("parameterization", "eps") if kind == "segldm-ldm" else None
    )
    if trained_as is not None and trained_as != model.parameterization:
        raise CheckpointError(
            f"{path} was trained with model.diffusion.parameterization={trained_as!r} but this run's config says "
            f"{model.parameterization!r}: the UNet's outputs would be read as the wrong quantity; set "
            f"model.diffusion.parameterization={trained_as} (or train from scratch)"
        )
    weights, ema = split_ema(state_dict)
    if model.use_ema and not ema:
        warnings.warn(
            f"init_from {path} has no model_ema.* weights: the EMA starts from the loaded weights",
            CheckpointWarning,
            stacklevel=2,
        )
        state_dict = {**weights, **{k: v for k, v in model.state_dict().items() if k.startswith(EMA_PREFIX)}}
    elif not model.use_ema and ema:
        warnings.warn(
            f"init_from {path} holds EMA weights but model.use_ema is false: they are not used",
            CheckpointWarning,
            stacklevel=2,
        )
        state_dict = weights
    check_schedule(model, state_dict, path)
    load_strict(
        model, state_dict, path, "the model of this run's config (init_from needs the same architecture)"
    )
    if model.use_ema and not ema:
        _restart_ema(model)
    model._restarted_from_ckpt = True


def _restart_ema(model: LatentDiffusion) -> None:
    """Shadows := the UNet weights just loaded (the freshly built EMA still holds the random init)."""
    with torch.no_grad():
        buffers = dict(model.model_ema.named_buffers())
        for name, param in model.model.named_parameters():
            if name in model.model_ema.m_name2s_name:
                buffers[model.model_ema.m_name2s_name[name]].copy_(param)


__all__ = [
    "build_ldm",
    "check_schedule",
    "init_from_checkpoint",
    "ldm_checkpoint",
    "ldm_config_of",
    "ldm_from_checkpoint",
    "upgrade_targets",
    "load_ldm",
]
