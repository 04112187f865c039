"""CompVis checkpoints into segldm models: the state_dict needs no renaming (segldm keeps CompVis's
keys), so loading is a strict ``load_state_dict`` after the config is translated."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from segldm.compat.compvis.config import Translation, read_compvis_config, translate_config
from segldm.compat.compvis.spec import FIRST_STAGE_DROPPED_PREFIXES, CompVisConfigError
from segldm.runtime.loading import build_ldm, check_schedule
from segldm.storage.checkpoint_files import (
    CheckpointError,
    checkpoint_kind,
    load_strict,
    read_checkpoint,
    reconcile_ema,
    state_dict_of,
    wrong_kind,
)
from segldm.training.ldm import LatentDiffusion


def read_compvis_checkpoint(path: str | Path, trust_checkpoint: bool = False) -> dict[str, Any]:
    """A CompVis LatentDiffusion checkpoint, read safely and checked to be one (not segldm, not a VQ)."""
    what = "CompVis LatentDiffusion checkpoint"
    checkpoint = read_checkpoint(path, what=what, trust_checkpoint=trust_checkpoint)
    kind = checkpoint_kind(checkpoint)
    if kind == "segldm-ldm":
        raise wrong_kind(
            path,
            kind,
            f"a {what}",
            "It carries its own config: load it with segldm.runtime.loading.load_ldm(path) or "
            f"python -m segldm.sample ckpt={path} (no CompVis config needed).",
        )
    if kind in ("vq-autoencoder", "segldm-autoencoder"):
        raise wrong_kind(
            path,
            kind,
            f"a {what}",
            "A first stage goes into first_stage_config.params.ckpt_path (CompVis) or "
            "model.first_stage.ckpt_path (segldm); pass the LDM's model.ckpt here.",
        )
    if kind != "compvis-ldm":
        raise wrong_kind(path, kind, f"a {what}", "Pass the model.ckpt that belongs to the config.")
    return checkpoint


def compvis_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LDM weights without the first stage's training-only entries (loss, its EMA, colorize)."""
    return {k: v for k, v in state_dict.items() if not k.startswith(FIRST_STAGE_DROPPED_PREFIXES)}


def model_from_compvis(
    translation: Translation, checkpoint: Mapping[str, Any], ckpt_path: str | Path
) -> tuple[LatentDiffusion, dict[str, Any]]:
    """Build the translated model, strictly load the checkpoint; returns (model, final model config)."""
    state_dict = compvis_state_dict(state_dict_of(checkpoint, ckpt_path, "CompVis checkpoint"))
    model_cfg = copy.deepcopy(translation.model)
    use_ema, state_dict = reconcile_ema(
        bool(model_cfg["use_ema"]), state_dict, ckpt_path, "model.params.use_ema"
    )
    if use_ema and "model_ema.decay" in state_dict:
        model_cfg["ema_decay"] = float(state_dict["model_ema.decay"])
    if "scale_factor" in state_dict and not model_cfg["scale_by_std"]:
        raise CheckpointError(
            f"{ckpt_path} has a scale_factor buffer ({float(state_dict['scale_factor']):.6g}, written by a model "
            f"trained with scale_by_std: true) but {translation.source} says scale_by_std: "
            f"{model_cfg['scale_by_std']} (scale_factor {model_cfg['scale_factor']}); use the config the "
            "checkpoint was trained with"
        )
    build_cfg = {**model_cfg, "use_ema": use_ema}
    try:
        model = build_ldm(build_cfg)
    except Exception as err:
        raise CompVisConfigError(
            f"{translation.source}: the translated model cannot be built: {err}"
        ) from err
    check_schedule(model, state_dict, ckpt_path)
    load_strict(model, state_dict, ckpt_path, f"the model {translation.source} describes")
    return model, model_cfg


def load_compvis(
    config_path: str | Path | Mapping[str, Any],
    ckpt_path: str | Path | None = None,
    *,
    trust_checkpoint: bool = False,
    device: str | torch.device = "cpu",
) -> LatentDiffusion:
    """A CompVis LatentDiffusion (config YAML + model.ckpt) as segldm's LatentDiffusion, in eval mode.

    The returned model has CompVis's interface (``encode_first_stage``, ``decode_first_stage``,
    ``get_learned_conditioning``, ``apply_model``, ``q_sample``, ``sample``, ``ema_scope``).
    ``ckpt_path`` defaults to the config's ``model.params.ckpt_path``. The checkpoint is read without
    running pickled code unless ``trust_checkpoint``.
    """
    translation = translate_config(config_path)
    if ckpt_path is None:
        ckpt_path = read_compvis_config(config_path)["model"]["params"].get("ckpt_path")
        if not ckpt_path:
            raise ValueError(
                f"no checkpoint: pass ckpt_path (the model.ckpt of {translation.source}); its config has no "
                "model.params.ckpt_path either"
            )
    checkpoint = read_compvis_checkpoint(ckpt_path, trust_checkpoint)
    model, model_cfg = model_from_compvis(translation, checkpoint, ckpt_path)
    model.segldm_config = {
        "model": {**model_cfg, "use_ema": model.use_ema},
        "scheduler": translation.scheduler,
        "data": {"group": translation.data_group, **translation.data},
        "compvis": {"config": translation.source, "checkpoint": str(ckpt_path)},
    }
    return model.to(device).eval()
