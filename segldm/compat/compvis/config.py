"""CompVis ``config.yaml`` -> segldm's Hydra model config: read, check every key against the tables in
:mod:`.spec`, translate (UNet, VQ first stage, SpatialRescaler, LR schedule, conditioning)."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segldm.compat.compvis.spec import (
    ACCEPTED_CLASSES,
    CONDITIONING_KEYS,
    DEFAULT_ONLY_LDM_KEYS,
    IGNORED_LDM_KEYS,
    LDM_DEFAULTS,
    SCHEDULER_PARAMS,
    SEGLDM_TARGETS,
    STRUCTURE_KEYS,
    SUPPORTED_VALUES,
    UNET_REFUSED,
    VQ_IGNORED,
    VQ_TRANSLATED,
    CompVisConfigError,
)
from segldm.diffusion.ddim import ddim_steps_valid, nearest_valid_ddim_steps
from segldm.models.autoencoder import Encoder
from segldm.models.cond_stage import SpatialRescaler
from segldm.models.unet import UNetModel
from segldm.training.options import group_flat_options


def read_compvis_config(config: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A CompVis YAML (or an already loaded mapping) as plain containers, checked to be one."""
    from omegaconf import OmegaConf

    source = str(config) if not isinstance(config, Mapping) else "<config mapping>"
    if isinstance(config, Mapping):
        data = OmegaConf.to_container(OmegaConf.create(dict(config)), resolve=True)
    else:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"CompVis config not found: {path}")
        try:
            data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        except Exception as err:
            raise CompVisConfigError(f"{path} is not a readable YAML config: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict) or "target" not in data["model"]:
        hint = ""
        if isinstance(data, dict) and isinstance(data.get("model"), dict) and "_target_" in data["model"]:
            hint = (
                " It looks like a segldm (Hydra) config: load its checkpoint with segldm.runtime.loading.load_ldm "
                "or python -m segldm.sample ckpt=<file>."
            )
        elif isinstance(data, dict) and isinstance(data.get("model"), dict) and "ddconfig" in str(data):
            hint = " It looks like a first-stage (autoencoder) config, not a LatentDiffusion one."
        raise CompVisConfigError(
            f"{source} is not a CompVis LatentDiffusion config: expected model.target and model.params.{hint}"
        )
    return data


def _class_name(target: Any) -> str:
    return str(target).rsplit(".", 1)[-1]


def _check_target(node: Any, slot: str, key: str) -> dict[str, Any]:
    """The ``params`` of a ``{target, params}`` node after checking its class is one segldm implements."""
    if not isinstance(node, Mapping) or "target" not in node:
        raise CompVisConfigError(f"{key} must be a mapping with 'target' and 'params', got {node!r}")
    if _class_name(node["target"]) not in ACCEPTED_CLASSES[slot]:
        raise CompVisConfigError(
            f"{key}.target={node['target']!r} is not supported; segldm implements "
            f"{' or '.join(ACCEPTED_CLASSES[slot])} here"
        )
    params = node.get("params") or {}
    if not isinstance(params, Mapping):
        raise CompVisConfigError(f"{key}.params must be a mapping, got {params!r}")
    return dict(params)


def _signature_defaults(cls: type, skip: tuple[str, ...] = ()) -> tuple[dict[str, Any], set[str]]:
    """(defaulted parameters with their defaults as YAML-friendly values, required parameter names)."""
    defaults, required = {}, set()
    for name, param in inspect.signature(cls).parameters.items():
        if name in skip or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.default is inspect.Parameter.empty:
            required.add(name)
        else:
            defaults[name] = list(param.default) if isinstance(param.default, tuple) else param.default
    return defaults, required


def _fill(
    cls: type, params: Mapping[str, Any], key: str, skip: tuple[str, ...] = ("attention_impl",)
) -> dict[str, Any]:
    """Every constructor argument of ``cls``: the given params over the defaults; unknown/missing named."""
    defaults, required = _signature_defaults(cls, skip)
    unknown = sorted(set(params) - set(defaults) - required)
    if unknown:
        raise CompVisConfigError(
            f"{key}: unknown key(s) {unknown} for {cls.__name__}; segldm understands "
            f"{sorted(set(defaults) | required)}"
        )
    missing = sorted(required - set(params))
    if missing:
        raise CompVisConfigError(f"{key}: required key(s) {missing} missing")
    out = {**defaults, **params}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


@dataclass
class Translation:
    """A CompVis config in segldm terms: the Hydra model config plus the groups and values around it."""

    model: dict[str, Any]
    scheduler_group: str
    scheduler: dict[str, Any]
    data_group: str
    data: dict[str, Any]
    source: str
    notes: list[str] = field(default_factory=list)

    @property
    def first_stage_factor(self) -> int:
        return 2 ** (len(self.model["first_stage"]["ddconfig"]["ch_mult"]) - 1)

    @property
    def n_labels(self) -> int:
        return int(self.model["cond_stage"]["in_channels"])


def _translate_unet(node: Any, key: str) -> dict[str, Any]:
    params = _check_target(node, "unet", key)
    for name, (allowed, why) in UNET_REFUSED.items():
        if name in params and params[name] != allowed:
            raise CompVisConfigError(
                f"{key}.params.{name}={params[name]!r}: {why} (segldm implements the mask-concat UNet of "
                f"CompVis semantic synthesis); remove it or set it to {allowed!r}"
            )
    unet = _fill(UNetModel, params, f"{key}.params")
    if unet["num_heads"] == -1 and unet["num_head_channels"] == -1:
        raise CompVisConfigError(f"{key}.params: set num_heads or num_head_channels (both are -1)")
    return {"_target_": SEGLDM_TARGETS["unet"], **unet}


def _translate_first_stage(node: Any, key: str) -> dict[str, Any]:
    params = _check_target(node, "first_stage", key)
    unknown = sorted(set(params) - set(VQ_TRANSLATED) - set(VQ_IGNORED))
    if unknown:
        raise CompVisConfigError(
            f"{key}.params: unknown key(s) {unknown} for the VQ first stage; segldm understands "
            f"{sorted(VQ_TRANSLATED + VQ_IGNORED)}"
        )
    if params.get("remap") is not None:
        raise CompVisConfigError(
            f"{key}.params.remap={params['remap']!r}: codebook remapping is not supported (only remap: null)"
        )
    ddconfig = dict(params.get("ddconfig") or {})
    attn_type = ddconfig.pop("attn_type", "vanilla")
    if attn_type != "vanilla":
        raise CompVisConfigError(
            f"{key}.params.ddconfig.attn_type={attn_type!r}: only 'vanilla' attention is supported"
        )
    for name in ("embed_dim", "n_embed"):
        if name not in params:
            raise CompVisConfigError(f"{key}.params.{name} is missing")
    return {
        "_target_": SEGLDM_TARGETS["first_stage"],
        "embed_dim": int(params["embed_dim"]),
        "n_embed": int(params["n_embed"]),
        "ckpt_path": None,
        "sane_index_shape": bool(params.get("sane_index_shape", False)),
        "ddconfig": _fill(Encoder, ddconfig, f"{key}.params.ddconfig"),
    }


def _translate_cond_stage(node: Any, key: str) -> dict[str, Any]:
    if isinstance(node, str):
        what = {
            "__is_unconditional__": "unconditional models are not supported (segldm is mask-conditioned)",
            "__is_first_stage__": "conditioning on the first stage's own encoding is not supported",
        }.get(node, "only a SpatialRescaler cond stage is supported")
        raise CompVisConfigError(f"{key}={node!r}: {what}")
    params = _check_target(node, "cond_stage", key)
    return {"_target_": SEGLDM_TARGETS["cond_stage"], **_fill(SpatialRescaler, params, f"{key}.params")}


def _translate_scheduler(node: Any, key: str) -> tuple[str, dict[str, Any]]:
    if node is None:  # CompVis without scheduler_config: constant learning rate
        return "constant", {
            "_target_": SEGLDM_TARGETS["scheduler_constant"],
            "warm_up_steps": 0,
            "f_start": 1.0,
        }
    params = _check_target(node, "scheduler", key)
    unknown = sorted(set(params) - set(SCHEDULER_PARAMS))
    if unknown:
        raise CompVisConfigError(f"{key}.params: unknown key(s) {unknown}; expected {list(SCHEDULER_PARAMS)}")
    missing = sorted(set(SCHEDULER_PARAMS[:5]) - set(params))
    if missing:
        raise CompVisConfigError(f"{key}.params: required key(s) {missing} missing")
    values = {k: params[k] for k in SCHEDULER_PARAMS[:5]}
    return "lambda_linear", {"_target_": SEGLDM_TARGETS["scheduler"], **values}


def default_ddim_steps(num_timesteps: int, preferred: int = 200) -> int:
    """log_images' DDIM default (200 steps), or the nearest count below it that CompVis's +1 shift
    keeps inside this model's schedule (200 steps crash the reference on T <= 200)."""
    if ddim_steps_valid(preferred, num_timesteps):
        return preferred
    below, _ = nearest_valid_ddim_steps(preferred, num_timesteps)
    return below or 1


def _conditioning_key(params: Mapping[str, Any]) -> str:
    key = params.get("conditioning_key")
    if key is None:
        if params.get("concat_mode", True):
            return "concat"
        raise CompVisConfigError(
            "model.params.concat_mode=false selects cross-attention conditioning ('crossattn'); segldm "
            "supports concat conditioning only (masks concatenated to the latent)"
        )
    if key != "concat":
        raise CompVisConfigError(
            f"model.params.conditioning_key={key!r} is not supported; segldm supports 'concat' only "
            "(no cross-attention, hybrid or adm conditioning)"
        )
    return "concat"


def _check_consistency(model: Mapping[str, Any]) -> None:
    """The wiring the checkpoint shapes cannot explain: latent channels and UNet in/out channels."""
    unet, first, cond = model["unet"], model["first_stage"], model["cond_stage"]
    cond_channels = cond["out_channels"] if cond["out_channels"] is not None else cond["in_channels"]
    problems = []
    if model["channels"] != first["embed_dim"]:
        problems.append(
            f"model.params.channels={model['channels']} but first_stage_config.params.embed_dim="
            f"{first['embed_dim']} (the diffusion runs on the first stage's latent)"
        )
    if unet["in_channels"] != model["channels"] + cond_channels:
        problems.append(
            f"unet_config.params.in_channels={unet['in_channels']} but concat conditioning gives channels "
            f"({model['channels']}) + cond stage channels ({cond_channels})"
        )
    if unet["out_channels"] != model["channels"]:
        problems.append(
            f"unet_config.params.out_channels={unet['out_channels']} but channels={model['channels']}"
        )
    if problems:
        raise CompVisConfigError("inconsistent CompVis config: " + "; ".join(problems))


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``, recursing into mappings (lists are replaced)."""
    out = copy.deepcopy(dict(base))
    for k, v in update.items():
        out[k] = (
            deep_merge(out[k], v)
            if isinstance(v, Mapping) and isinstance(out.get(k), Mapping)
            else copy.deepcopy(v)
        )
    return out


def translate_config(config: str | Path | Mapping[str, Any]) -> Translation:
    """A CompVis LatentDiffusion config -> :class:`Translation` (segldm model config, scheduler, data).

    Raises :class:`CompVisConfigError` naming the key for anything segldm would not reproduce.
    """
    source = str(config) if not isinstance(config, Mapping) else "<config mapping>"
    cfg = read_compvis_config(config)
    params = _check_target(cfg["model"], "ldm", "model")
    known = set(LDM_DEFAULTS) | set(STRUCTURE_KEYS) | set(CONDITIONING_KEYS) | set(IGNORED_LDM_KEYS)
    unknown = sorted(set(params) - known - set(DEFAULT_ONLY_LDM_KEYS))
    if unknown:
        raise CompVisConfigError(
            f"{source}: model.params has key(s) segldm does not know: {unknown}. Supported: "
            f"{sorted(known | set(DEFAULT_ONLY_LDM_KEYS))}"
        )
    for name, allowed in DEFAULT_ONLY_LDM_KEYS.items():
        if name in params and params[name] not in allowed:
            raise CompVisConfigError(
                f"{source}: model.params.{name}={params[name]!r} is not supported by segldm; remove it or "
                f"set it to {allowed[0]!r}"
            )
    values = {**LDM_DEFAULTS, **{k: params[k] for k in LDM_DEFAULTS if k in params}}
    for name, supported in SUPPORTED_VALUES.items():
        if values[name] not in supported:
            raise CompVisConfigError(
                f"{source}: model.params.{name}={values[name]!r} is not supported; segldm supports {list(supported)}"
            )
    for name in ("unet_config", "first_stage_config", "cond_stage_config"):
        if name not in params:
            raise CompVisConfigError(f"{source}: model.params.{name} is missing")
    notes = [f"model.params.{k} ignored ({IGNORED_LDM_KEYS[k]})" for k in IGNORED_LDM_KEYS if k in params]
    model: dict[str, Any] = {
        "_target_": SEGLDM_TARGETS["ldm"],
        "_convert_": "all",
        **{k: values[k] for k in LDM_DEFAULTS},
        "conditioning_key": _conditioning_key(params),
        "ema_decay": 0.9999,  # CompVis LitEma's fixed default; a checkpoint's model_ema.decay wins on load
        "base_learning_rate": float(cfg["model"].get("base_learning_rate", 1.0e-6)),
        "scale_lr": True,  # CompVis main.py --scale_lr defaults to True
        "weight_decay": 0.01,  # torch AdamW default, which CompVis uses
        "adam_betas": [0.9, 0.999],
        "require_pretrained_first_stage": True,
        "sampler": {"steps": default_ddim_steps(int(values["timesteps"])), "eta": 1.0},
        "unet": _translate_unet(params["unet_config"], "model.params.unet_config"),
        "first_stage": _translate_first_stage(
            params["first_stage_config"], "model.params.first_stage_config"
        ),
        "cond_stage": _translate_cond_stage(params["cond_stage_config"], "model.params.cond_stage_config"),
    }
    scheduler_group, scheduler = _translate_scheduler(
        params.get("scheduler_config"), "model.params.scheduler_config"
    )
    data_group, data = "sflckr", {}
    batch_size = ((cfg.get("data") or {}).get("params") or {}).get("batch_size")
    if batch_size is not None:
        data["batch_size"] = int(batch_size)
    model = group_flat_options(model)
    stash = cfg.get("segldm") or {}
    if stash:  # exports of segldm before the option groups hold flat keys: grouped here
        model = deep_merge(model, group_flat_options(stash.get("model") or {}))
        if stash.get("data_group"):
            data_group, data = str(stash["data_group"]), dict(stash.get("data") or {})
        if stash.get("scheduler_group"):
            scheduler_group, scheduler = str(stash["scheduler_group"]), dict(stash.get("scheduler") or {})
        notes.append("segldm section read back (settings CompVis has no place for)")
    _check_consistency(model)
    translation = Translation(model, scheduler_group, scheduler, data_group, data, source, notes)
    translation.data.setdefault("size", int(model["image_size"]) * translation.first_stage_factor)
    translation.data.setdefault("n_labels", translation.n_labels)
    return translation
