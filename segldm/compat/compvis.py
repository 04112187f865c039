"""CompVis ``LatentDiffusion`` configs and checkpoints, in and out of segldm.

The only module that knows CompVis names: ``model.params`` keys and ``target`` paths are
translated into segldm's Hydra model config (``conf/model/ldm_seg.yaml`` layout), and back for
export. The state_dict needs no renaming: segldm's modules keep CompVis's keys
(``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``, ``model_ema.*``,
the schedule buffers), so loading is a strict ``load_state_dict``.

What is translated, accepted or refused is listed in the tables below; every refusal names the
config key, its value and what segldm supports instead.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from segldm.checkpoints import (
    CheckpointError,
    build_ldm,
    check_schedule,
    checkpoint_kind,
    load_strict,
    read_checkpoint,
    reconcile_ema,
    state_dict_of,
    wrong_kind,
)
from segldm.diffusion.ddim import ddim_steps_valid, nearest_valid_ddim_steps
from segldm.models.autoencoder import Encoder
from segldm.models.cond_stage import SpatialRescaler
from segldm.models.ldm import LatentDiffusion
from segldm.models.unet import UNetModel

# ---------------------------------------------------------------------------------------------- names
COMPVIS_TARGETS: dict[str, str] = {
    "ldm": "ldm.models.diffusion.ddpm.LatentDiffusion",
    "unet": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
    "first_stage": "ldm.models.autoencoder.VQModelInterface",
    "cond_stage": "ldm.modules.encoders.modules.SpatialRescaler",
    "scheduler": "ldm.lr_scheduler.LambdaLinearScheduler",
    "loss": "torch.nn.Identity",
    "data": "main.DataModuleFromConfig",
    "data_train": "ldm.data.flickr.FlickrSegTrain",
    "data_validation": "ldm.data.flickr.FlickrSegEval",
}
"""What :func:`compvis_config_from_segldm` writes (the seed config's targets)."""

ACCEPTED_CLASSES: dict[str, tuple[str, ...]] = {
    "ldm": ("LatentDiffusion",),
    "unet": ("UNetModel",),
    "first_stage": ("VQModelInterface", "VQModel"),
    "cond_stage": ("SpatialRescaler",),
    "scheduler": ("LambdaLinearScheduler",),
}
"""Accepted ``target`` class names per slot (the module path may differ between forks)."""

SEGLDM_TARGETS: dict[str, str] = {
    "ldm": "segldm.models.ldm.LatentDiffusion",
    "unet": "segldm.models.unet.UNetModel",
    "first_stage": "segldm.models.autoencoder.VQModel",
    "cond_stage": "segldm.models.cond_stage.SpatialRescaler",
    "scheduler": "segldm.lr_schedulers.LambdaLinearScheduler",
    "scheduler_constant": "segldm.lr_schedulers.ConstantScheduler",
}

# DDPM.__init__ / LatentDiffusion.__init__ defaults (latent-diffusion a506df5) of the translated keys:
# segldm's own defaults differ for some (cond_stage_trainable, cond_stage_key), so they are explicit.
LDM_DEFAULTS: dict[str, Any] = {
    "timesteps": 1000,
    "beta_schedule": "linear",
    "linear_start": 1e-4,
    "linear_end": 2e-2,
    "cosine_s": 8e-3,
    "v_posterior": 0.0,
    "loss_type": "l2",
    "parameterization": "eps",
    "l_simple_weight": 1.0,
    "original_elbo_weight": 0.0,
    "first_stage_key": "image",
    "cond_stage_key": "image",
    "image_size": 256,
    "channels": 3,
    "cond_stage_trainable": False,
    "scale_factor": 1.0,
    "scale_by_std": False,
    "use_ema": True,
}
STRUCTURE_KEYS = ("unet_config", "first_stage_config", "cond_stage_config", "scheduler_config")
CONDITIONING_KEYS = ("concat_mode", "conditioning_key")
IGNORED_LDM_KEYS: dict[str, str] = {
    "log_every_t": "logging interval of intermediates",
    "monitor": "Lightning checkpoint monitor (segldm's callbacks config decides)",
    "ignore_keys": "only used with the LDM's own ckpt_path",
    "ckpt_path": "the checkpoint given to the loader is the one loaded",
    "load_only_unet": "only used with the LDM's own ckpt_path",
    "clip_denoised": "only ancestral sampling reads it (LatentDiffusion forces it off; DDIM never clips)",
}
DEFAULT_ONLY_LDM_KEYS: dict[str, tuple[Any, ...]] = {
    "num_timesteps_cond": (None, 1),
    "cond_stage_forward": (None,),
    "given_betas": (None,),
    "learn_logvar": (False,),
    "logvar_init": (0, 0.0),
    "use_positional_encodings": (False,),
    "make_it_fit": (False,),
    "ucg_training": (None,),
    "reset_ema": (False,),
    "reset_num_ema_updates": (False,),
}
SUPPORTED_VALUES: dict[str, tuple[str, ...]] = {
    "beta_schedule": ("linear", "cosine", "sqrt_linear", "sqrt"),
    "loss_type": ("l1", "l2"),
    "parameterization": ("eps", "x0"),
}
UNET_REFUSED: dict[str, tuple[Any, str]] = {
    "use_spatial_transformer": (False, "the spatial transformer (cross-attention) UNet is not supported"),
    "context_dim": (None, "cross-attention context is not supported"),
    "num_classes": (None, "class-conditional UNets are not supported"),
    "n_embed": (None, "the UNet's codebook-prediction head is not supported"),
    "dims": (2, "only 2-D UNets are supported"),
    "use_new_attention_order": (False, "only the legacy QKV attention order is supported"),
    "use_fp16": (False, "fp16 weights are not supported; use trainer.precision for mixed precision"),
}
VQ_TRANSLATED = ("ddconfig", "n_embed", "embed_dim", "remap", "sane_index_shape")
VQ_IGNORED = (
    "lossconfig",
    "ckpt_path",
    "ignore_keys",
    "image_key",
    "colorize_nlabels",
    "monitor",
    "batch_resize_range",
    "scheduler_config",
    "lr_g_factor",
    "use_ema",
)
FIRST_STAGE_DROPPED_PREFIXES = (
    "first_stage_model.loss.",  # LPIPS/discriminator of a non-Identity lossconfig
    "first_stage_model.model_ema.",  # the autoencoder's own EMA (use_ema); the LDM decodes with raw weights
    "first_stage_model.colorize",  # VQModel's to_rgb projection (colorize_nlabels)
)
SCHEDULER_PARAMS = ("warm_up_steps", "f_min", "f_max", "f_start", "cycle_lengths", "verbosity_interval")
SEGLDM_ONLY_NOTE = (
    "segldm settings CompVis configs have no place for; CompVis ignores this section, "
    "python -m segldm.convert compvis reads it back"
)


class CompVisConfigError(ValueError):
    """A CompVis config segldm cannot represent (names the key, its value and what is supported)."""


class CompVisWarning(UserWarning):
    """A CompVis setting that is accepted but has no effect, or a segldm setting CompVis cannot hold."""


# ---------------------------------------------------------------------------------------------- reading
def conf_dir() -> Path:
    """segldm's Hydra config tree (``conf/`` beside the package, as ``segldm.train`` finds it)."""
    return Path(__file__).resolve().parents[2] / "conf"


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
                " It looks like a segldm (Hydra) config: load its checkpoint with segldm.checkpoints.load_ldm "
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


# ---------------------------------------------------------------------------------------------- translation
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
    stash = cfg.get("segldm") or {}
    if stash:
        model = deep_merge(model, stash.get("model") or {})
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


# ---------------------------------------------------------------------------------------------- loading
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
            "It carries its own config: load it with segldm.checkpoints.load_ldm(path) or "
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


# ---------------------------------------------------------------------------------------------- export
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


def compvis_config_from_segldm(config: Mapping[str, Any]) -> dict[str, Any]:
    """A segldm run config (``model``, ``data``, ``scheduler``) -> the CompVis config of the same model.

    Settings CompVis has no key for (EMA decay, AdamW details, sampler defaults, attention
    implementation, a non-LambdaLinear schedule, segldm's data config) go to a top-level
    ``segldm:`` section that CompVis ignores and :func:`translate_config` reads back, so
    export -> convert gives the same segldm config.
    """
    model = config.get("model") or {}
    if not str(model.get("_target_", "")).endswith("LatentDiffusion"):
        raise CompVisConfigError(
            f"only LDM configs can be exported (model._target_={model.get('_target_')!r}); first-stage "
            "checkpoints have no CompVis LatentDiffusion equivalent"
        )
    unet, first, cond = model["unet"], model["first_stage"], model["cond_stage"]
    params: dict[str, Any] = {k: copy.deepcopy(model[k]) for k in LDM_DEFAULTS if k in model}
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
            "base_learning_rate": model.get("base_learning_rate", 1.0e-6),
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
    for option in sorted((conf_dir() / group).glob("*.yaml")):
        candidate = OmegaConf.to_container(OmegaConf.load(option))
        if isinstance(candidate, dict) and signature(candidate) == wanted:
            return option.stem
    raise CompVisConfigError(f"{group} config with targets {wanted} matches no option in conf/{group}/")


__all__ = [
    "COMPVIS_TARGETS",
    "CompVisConfigError",
    "CompVisWarning",
    "Translation",
    "compvis_config_from_segldm",
    "compvis_state_dict",
    "load_compvis",
    "model_from_compvis",
    "read_compvis_checkpoint",
    "read_compvis_config",
    "translate_config",
]
