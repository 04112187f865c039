"""segldm runs back to CompVis: a ``config.yaml`` the reference's ``instantiate_from_config`` builds,
with what segldm adds (and CompVis lacks) listed instead of silently dropped."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

from hydra.utils import get_object

from segldm.compat.compvis.config import _class_name, translate_config
from segldm.compat.compvis.spec import (
    COMPVIS_TARGETS,
    LDM_DEFAULTS,
    SCHEDULER_PARAMS,
    SEGLDM_ONLY_NOTE,
    CompVisConfigError,
    CompVisWarning,
)
from segldm.config.locations import config_dir
from segldm.training.ldm import LatentDiffusion
from segldm.training.options import flatten_options


def _strip(node: Mapping[str, Any], *drop: str) -> dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in node.items() if k not in ("_target_", "_convert_", *drop)}


def config_diff(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> dict[str, Any]:
    """Entries of ``ours`` that ``theirs`` lacks or holds differently (recursing into mappings)."""
    out: dict[str, Any] = {}
    for k, v in ours.items():
        if isinstance(v, Mapping) and isinstance(theirs.get(k), Mapping):
            sub = config_diff(v, theirs[k])
            if sub:
                out[k] = sub
        elif k not in theirs or theirs[k] != v:
            out[k] = copy.deepcopy(v)
    return out


def builds_an_ldm(model: Mapping[str, Any]) -> bool:
    """Whether a model config's ``_target_`` is LatentDiffusion or a subclass of it (by the class, not its name)."""
    try:
        cls = get_object(str(model.get("_target_")))
    except Exception:  # Hydra's import errors: ImportError, ValueError, AttributeError
        return False
    return isinstance(cls, type) and issubclass(cls, LatentDiffusion)


def compvis_config_from_segldm(config: Mapping[str, Any]) -> dict[str, Any]:
    """A segldm run config (``model``, ``data``, ``scheduler``) -> the CompVis config of the same model.

    Settings CompVis has no key for (EMA decay, AdamW details, sampler defaults, attention
    implementation, a non-LambdaLinear schedule, segldm's data config) go to a top-level
    ``segldm:`` section that CompVis ignores and :func:`translate_config` reads back, so
    export -> convert gives the same segldm config.
    """
    model = config.get("model") or {}
    if not builds_an_ldm(model):
        raise CompVisConfigError(
            f"only LDM configs can be exported (model._target_={model.get('_target_')!r}); first-stage "
            "checkpoints have no CompVis LatentDiffusion equivalent"
        )
    unet, first, cond = model["unet"], model["first_stage"], model["cond_stage"]
    flat = {**model, **flatten_options(model)}  # CompVis names the grouped options flat
    params: dict[str, Any] = {k: copy.deepcopy(flat[k]) for k in LDM_DEFAULTS if k in flat}
    params["monitor"] = "val/loss"
    params["concat_mode"] = True
    params["conditioning_key"] = model.get("conditioning_key", "concat")
    params["unet_config"] = {"target": COMPVIS_TARGETS["unet"], "params": _strip(unet, "attention_impl")}
    ddconfig = _strip(first["ddconfig"], "attention_impl")
    first_params = {
        "embed_dim": first["embed_dim"],
        "n_embed": first["n_embed"],
        "ddconfig": ddconfig,
        "lossconfig": {"target": COMPVIS_TARGETS["loss"]},
    }
    if first.get("sane_index_shape"):
        first_params["sane_index_shape"] = True
    params["first_stage_config"] = {"target": COMPVIS_TARGETS["first_stage"], "params": first_params}
    params["cond_stage_config"] = {"target": COMPVIS_TARGETS["cond_stage"], "params": _strip(cond)}
    scheduler = config.get("scheduler") or None
    scheduler_target = _class_name((scheduler or {}).get("_target_", ""))
    stash: dict[str, Any] = {"note": SEGLDM_ONLY_NOTE}
    if scheduler_target == "LambdaLinearScheduler":
        params["scheduler_config"] = {
            "target": COMPVIS_TARGETS["scheduler"],
            "params": {k: copy.deepcopy(scheduler[k]) for k in SCHEDULER_PARAMS[:5]},
        }
    elif scheduler is not None and not (
        scheduler_target == "ConstantScheduler" and int(scheduler.get("warm_up_steps", 0)) == 0
    ):
        warnings.warn(
            f"scheduler {scheduler.get('_target_')} has no CompVis equivalent: CompVis trains it with a "
            "constant learning rate; it is kept in the config's segldm section",
            CompVisWarning,
            stacklevel=2,
        )
        stash["scheduler_group"] = _group_of("scheduler", scheduler)
        stash["scheduler"] = copy.deepcopy(dict(scheduler))
    data = config.get("data") or {}
    size = int(model["image_size"]) * 2 ** (len(first["ddconfig"]["ch_mult"]) - 1)
    out = {
        "model": {
            "base_learning_rate": flat["base_learning_rate"],
            "target": COMPVIS_TARGETS["ldm"],
            "params": params,
        },
        "data": {
            "target": COMPVIS_TARGETS["data"],
            "params": {
                "batch_size": int(data.get("batch_size", 12)),
                "train": {"target": COMPVIS_TARGETS["data_train"], "params": {"size": size}},
                "validation": {"target": COMPVIS_TARGETS["data_validation"], "params": {"size": size}},
            },
        },
    }
    back = translate_config(out).model
    model_diff = config_diff(_strip_paths(model), _strip_paths(back))
    if model_diff:
        stash["model"] = model_diff
    if data:
        stash["data_group"] = _group_of("data", data)
        # top-level values only: the option's datasets interpolate them (so data.root= still moves them)
        stash["data"] = {
            k: copy.deepcopy(v) for k, v in data.items() if k != "_target_" and not isinstance(v, Mapping)
        }
    out["segldm"] = stash
    return out


def _strip_paths(model: Mapping[str, Any]) -> dict[str, Any]:
    """The model config without the machine-specific first-stage file settings (not exported)."""
    out = copy.deepcopy(dict(model))
    out.pop("require_pretrained_first_stage", None)
    if isinstance(out.get("first_stage"), dict):
        out["first_stage"].pop("ckpt_path", None)
    return out


def _group_of(group: str, node: Mapping[str, Any]) -> str:
    """The conf/<group>/ option whose target(s) match ``node`` (its datasets' targets for data)."""
    from omegaconf import OmegaConf

    def signature(n: Mapping[str, Any]) -> tuple[str, ...]:
        parts = [str(n.get("_target_"))]
        for sub in ("train", "validation"):
            if isinstance(n.get(sub), Mapping):
                parts.append(str(n[sub].get("_target_")))
        return tuple(parts)

    wanted = signature(node)
    for option in sorted((config_dir() / group).glob("*.yaml")):
        candidate = OmegaConf.to_container(OmegaConf.load(option))
        if isinstance(candidate, dict) and signature(candidate) == wanted:
            return option.stem
    raise CompVisConfigError(f"{group} config with targets {wanted} matches no option in conf/{group}/")
