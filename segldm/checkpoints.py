"""Checkpoint IO shared by every entry point: safe reading, kind detection, strict loading, atomic saving.

Checkpoints are read with ``torch.load(weights_only=True)``, which never runs code from the file;
a file that needs more (pickled Python objects) fails with a message naming it and the opt-in
(``trust_checkpoint``). A native segldm LDM checkpoint is ``{"state_dict", "global_step",
"segldm": {"kind": "ldm", "config": <resolved run config>}}`` (what ``segldm.train`` writes through
``LatentDiffusion.on_save_checkpoint`` and what ``segldm.convert compvis`` writes); :func:`load_ldm`
rebuilds the model from that config and loads the weights strictly.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segldm.checkpoint_io import atomic_save
from segldm.models.ldm import LatentDiffusion

EMA_PREFIX = "model_ema."
TRUST_HELP = (
    "If you trust the file (it may run code when unpickled), allow it with trust_checkpoint=True "
    "(Python), --trust-checkpoint (segldm.convert) or trust_checkpoint=true (segldm.sample / "
    "segldm.train init_from); or re-save only its tensors once: torch.save({'state_dict': "
    "torch.load(path, weights_only=False)['state_dict']}, new_path)"
)
KIND_DESCRIPTIONS: dict[str, str] = {
    "segldm-ldm": "a segldm LDM checkpoint (segldm.kind = 'ldm')",
    "segldm-autoencoder": "a segldm first-stage (VQ autoencoder) checkpoint",
    "segldm-segmenter": "a segldm segmenter checkpoint (segldm.train_segmenter, used by segldm.eval for mIoU)",
    "compvis-ldm": "a CompVis LatentDiffusion checkpoint (model.diffusion_model.* keys, no segldm config inside)",
    "vq-autoencoder": "a CompVis/taming VQ autoencoder (first-stage) checkpoint (encoder.*, decoder.*, quantize.* keys)",
    "unknown": "a state_dict segldm does not recognise (no model.diffusion_model.* and no encoder.* keys)",
}
SCHEDULE_CONFIG_KEYS = "model.timesteps, beta_schedule, linear_start, linear_end, cosine_s, v_posterior"


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, of the wrong kind, or does not fit the model (names file and keys)."""


class CheckpointWarning(UserWarning):
    """A checkpoint loads, but not exactly as its config asks (e.g. no EMA weights in it)."""


def list_keys(keys: Iterable[str], limit: int = 10) -> str:
    """Sorted, comma-separated, at most ``limit`` shown (error messages stay readable for 600 keys)."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys) - limit} more)" if len(keys) > limit else shown


def read_checkpoint(
    path: str | Path,
    *,
    what: str = "checkpoint",
    trust_checkpoint: bool = False,
    missing_help: str = "",
) -> dict[str, Any]:
    """The top-level mapping of a checkpoint file, read without running pickled code by default.

    A bare state_dict (a mapping of names to tensors) is returned as ``{"state_dict": it}``.
    Raises ``FileNotFoundError`` for a missing file and :class:`CheckpointError` naming the file and
    ``what`` was expected when it is not a readable torch checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}. {missing_help}".rstrip())
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_checkpoint)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "weights only" in text.lower() or "weights_only" in text:
            detail = next((line.strip() for line in text.splitlines() if "GLOBAL" in line), "")
            raise CheckpointError(
                f"{what} {path} holds pickled Python objects besides tensors, which safe "
                f"(weights_only) loading refuses{f' ({detail})' if detail else ''}. {TRUST_HELP}"
            ) from err
        raise CheckpointError(f"{what} {path} is not a readable torch checkpoint ({err})") from err
    except Exception as err:  # the unpickler raises anything (RuntimeError, EOFError, ...) on garbage
        raise CheckpointError(
            f"{what} {path} is not a readable torch checkpoint (truncated or corrupt?): {err}"
        ) from err
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"state_dict": dict(obj)}
    if not isinstance(obj, Mapping) or not isinstance(obj.get("state_dict"), Mapping):
        raise CheckpointError(
            f"{what} {path} does not contain a state_dict (a mapping of names to tensors, or a dict "
            f"with a 'state_dict' entry); got {type(obj).__name__}"
        )
    return dict(obj)


def state_dict_of(
    checkpoint: Mapping[str, Any], path: str | Path, what: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """``checkpoint["state_dict"]`` checked to be a non-empty mapping of names to tensors."""
    state_dict = checkpoint.get("state_dict")
    if (
        not isinstance(state_dict, Mapping)
        or not state_dict
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items())
    ):
        raise CheckpointError(f"{what} {path} does not contain a state_dict (a mapping of names to tensors)")
    return dict(state_dict)


def checkpoint_kind(checkpoint: Mapping[str, Any]) -> str:
    """One of the :data:`KIND_DESCRIPTIONS` keys, from the ``segldm`` section or else the key names."""
    section = checkpoint.get("segldm")
    if isinstance(section, Mapping):
        kind = f"segldm-{section.get('kind')}"
        return kind if kind in KIND_DESCRIPTIONS else "unknown"
    keys = list((checkpoint.get("state_dict") or {}).keys())
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "compvis-ldm"
    if any(k.startswith("vq.encoder.") for k in keys):
        return "segldm-autoencoder"
    if any(k.startswith("encoder.") for k in keys) and any(k.startswith("quantize.") for k in keys):
        return "vq-autoencoder"
    return "unknown"


def wrong_kind(path: str | Path, kind: str, expected: str, way_out: str) -> CheckpointError:
    """The error for a checkpoint of another kind than the caller needs."""
    return CheckpointError(f"{path}: expected {expected}, but this is {KIND_DESCRIPTIONS[kind]}. {way_out}")


def state_dict_problems(own: Mapping[str, torch.Tensor], loaded: Mapping[str, torch.Tensor]) -> list[str]:
    """Missing keys, unexpected keys and shape mismatches of ``loaded`` against ``own`` (empty: fits)."""
    problems = []
    missing = own.keys() - loaded.keys()
    unexpected = loaded.keys() - own.keys()
    if missing:
        problems.append(f"{len(missing)} missing key(s): {list_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {list_keys(unexpected)}")
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in sorted(loaded.items())
        if k in own and v.shape != own[k].shape
    ]
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): " + "; ".join(shapes[:10]))
    return problems


def load_strict(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], path: str | Path, what: str
) -> None:
    """``module.load_state_dict(strict=True)`` with an error naming the file and every bad key."""
    problems = state_dict_problems(module.state_dict(), state_dict)
    if problems:
        raise CheckpointError(f"{path} does not match {what}: " + " | ".join(problems))
    module.load_state_dict(state_dict, strict=True)


def split_ema(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights, ``model_ema.*`` entries) of an LDM state_dict."""
    weights = {k: v for k, v in state_dict.items() if not k.startswith(EMA_PREFIX)}
    ema = {k: v for k, v in state_dict.items() if k.startswith(EMA_PREFIX)}
    return weights, ema


def reconcile_ema(
    use_ema: bool, state_dict: Mapping[str, torch.Tensor], path: str | Path, config_key: str
) -> tuple[bool, dict[str, torch.Tensor]]:
    """Decide whether the model is built with EMA from what the checkpoint holds (CompVis semantics).

    Config use_ema and ``model_ema.*`` present: EMA on. use_ema but no shadows: EMA off with a warning
    (sampling uses the raw weights). Shadows but use_ema false: they are dropped with a warning, as
    the reference (strict=False) ignores them.
    """
    weights, ema = split_ema(state_dict)
    if use_ema and not ema:
        warnings.warn(
            f"{config_key} is true but {path} has no model_ema.* weights: building the model without EMA, "
            "so sampling uses the raw (non-averaged) UNet weights",
            CheckpointWarning,
            stacklevel=3,
        )
        return False, weights
    if not use_ema and ema:
        warnings.warn(
            f"{path} holds EMA weights (model_ema.*) but {config_key} is false: they are ignored and "
            f"sampling uses the raw weights; set {config_key}=true to sample with them",
            CheckpointWarning,
            stacklevel=3,
        )
        return False, weights
    return use_ema, dict(state_dict)


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
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    import segldm  # noqa: F401  (resolvers, in case the config still holds interpolations)

    cfg = OmegaConf.create(dict(model_config))
    cfg.first_stage.ckpt_path = None
    cfg.require_pretrained_first_stage = False
    model = instantiate(cfg)
    if not isinstance(model, LatentDiffusion):
        raise CheckpointError(f"model config builds {type(model).__name__}, not a LatentDiffusion")
    return model


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
    return dict(config)


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


def save_checkpoint(checkpoint: Mapping[str, Any], path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename: no half-written checkpoints.

    The same writer as training's (segldm.checkpoint_io.atomic_save); failures name the file and cause.
    """
    return atomic_save(dict(checkpoint), path)


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


def init_from_checkpoint(model: LatentDiffusion, path: str | Path, trust_checkpoint: bool = False) -> None:
    """Start training from the weights of an LDM checkpoint (fresh optimizer, step 0).

    The run's config must build the same architecture: every missing/unexpected key or shape is
    named. EMA follows :func:`reconcile_ema` (a checkpoint without shadows starts them from the
    loaded weights). ``scale_by_std`` keeps the checkpoint's scale factor, as CompVis does when it
    restarts from a checkpoint.
    """
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


def apply_init_from(model: nn.Module, cfg: Mapping[str, Any]) -> None:
    """``segldm.train`` hook: load ``cfg.init_from`` into the freshly built model (no-op when unset).

    Also catches ``ckpt_path=<weights-only file>`` (e.g. segldm.convert output), which Lightning's
    resume would reject with a bare KeyError, and points at ``init_from``.
    """
    init_from = cfg.get("init_from")
    if not init_from:
        if cfg.get("ckpt_path"):
            _check_resumable(cfg["ckpt_path"])
        return
    if cfg.get("ckpt_path"):
        raise CheckpointError(
            f"init_from={init_from} and ckpt_path={cfg.get('ckpt_path')} are both set: ckpt_path resumes a "
            "run (weights, optimizer, step), init_from starts a new one from weights; set only one"
        )
    if not isinstance(model, LatentDiffusion):
        raise CheckpointError(
            f"init_from={init_from} needs model=ldm_seg (got {type(model).__name__}); to start a first stage "
            "from weights use model.first_stage.ckpt_path"
        )
    init_from_checkpoint(model, init_from, trust_checkpoint=bool(cfg.get("trust_checkpoint", False)))


def _check_resumable(path: str | Path) -> None:
    """A resume needs Lightning's training state; a weights-only checkpoint gets the init_from hint."""
    try:  # mmap: only the pickle is read, the tensors stay on disk
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return  # missing/unreadable/legacy files: Lightning reports them itself
    if isinstance(checkpoint, Mapping) and "optimizer_states" not in checkpoint:
        raise CheckpointError(
            f"ckpt_path={path} holds weights only (no optimizer/loop state, e.g. written by segldm.convert), "
            f"so a run cannot resume from it; start a new run from its weights with init_from={path} "
            "(and ckpt_path=null)"
        )


__all__ = [
    "CheckpointError",
    "CheckpointWarning",
    "apply_init_from",
    "build_ldm",
    "checkpoint_kind",
    "init_from_checkpoint",
    "ldm_checkpoint",
    "ldm_from_checkpoint",
    "list_keys",
    "load_ldm",
    "load_strict",
    "read_checkpoint",
    "reconcile_ema",
    "save_checkpoint",
    "state_dict_of",
    "state_dict_problems",
]
