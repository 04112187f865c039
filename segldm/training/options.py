"""The LightningModules' option groups: what `model.diffusion`, `model.optimization`,
`model.performance` and `model.validation` may hold, their defaults, and the move from the flat
layout older runs used.

The groups separate what decides the numbers (the forward process and objective), how they are
optimised, how fast they are computed (bit-exact or to float rounding) and how validation draws
its noise, so a sweep or a benchmark names one sub-tree. CompVis's attribute names stay on the
module (`num_timesteps`, `loss_type`, `parameterization`, ...): only the constructor is grouped.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hydra.utils import get_object

from segldm.training.optimizers import ADAMW, TAMING_ADAM


@dataclass(frozen=True)
class DiffusionOptions:
    """Forward process and training objective (CompVis's defaults; the seed's are in conf/)."""

    timesteps: int = 1000
    beta_schedule: str = "linear"
    linear_start: float = 1e-4
    linear_end: float = 2e-2
    cosine_s: float = 8e-3
    v_posterior: float = 0.0
    loss_type: str = "l2"
    parameterization: str = "eps"
    l_simple_weight: float = 1.0
    original_elbo_weight: float = 0.0
    loss_weighting: str = "none"
    min_snr_gamma: float = 5.0
    cond_drop_prob: float = 0.0
    zero_terminal_snr: bool = False  # Lin et al. 2024: rescale so the last timestep is pure noise (v or x0)


@dataclass(frozen=True)
class OptimizationOptions:
    """The optimiser (a `_partial_` torch optimiser config, AdamW by default: training/optimizers.py)
    and its learning rate (the LR schedule is the `scheduler` config group)."""

    base_learning_rate: float = 1e-6
    scale_lr: bool = True
    optimizer: Any = field(default_factory=lambda: copy.deepcopy(ADAMW))


@dataclass(frozen=True)
class AutoencoderOptimizationOptions:
    """The first stage's optimiser (taming's Adam betas by default) and its learning rate."""

    base_learning_rate: float = 4.5e-6
    scale_lr: bool = True
    optimizer: Any = field(default_factory=lambda: copy.deepcopy(TAMING_ADAM))


@dataclass(frozen=True)
class PerformanceOptions:
    """Speed/memory paths, each equal to the reference path (tested) and measured by `make bench`."""

    first_stage_inference_mode: bool = True
    fused_label_conditioning: bool = True
    channels_last: bool = False
    compile: bool | dict[str, Any] = False
    compile_first_stage: bool | dict[str, Any] = False
    cache_latents: bool = False


@dataclass(frozen=True)
class ValidationOptions:
    """val/loss draws: the same timestep and noise per sample every time (false: CompVis's draws)."""

    deterministic: bool = True
    seed: int = 0


OPTION_GROUPS: dict[str, type] = {
    "diffusion": DiffusionOptions,
    "optimization": OptimizationOptions,
    "performance": PerformanceOptions,
    "validation": ValidationOptions,
}

# `model.optimization.<name>` before the optimiser was config -> its key in `model.optimization.optimizer`
LEGACY_OPTIMIZER_KEYS: dict[str, str] = {
    "weight_decay": "weight_decay",
    "adam_betas": "betas",
    "fused_optimizer": "fused",
}
AUTOENCODER_LEGACY_OPTIMIZER_KEYS: dict[str, str] = {"adam_betas": "betas"}

# flat `model.<name>` (segldm before the groups) -> (group, name in the group)
FLAT_OPTION_KEYS: dict[str, tuple[str, str]] = {
    **{f.name: ("diffusion", f.name) for f in dataclasses.fields(DiffusionOptions)},
    **{f.name: ("optimization", f.name) for f in dataclasses.fields(OptimizationOptions)},
    **{name: ("optimization", name) for name in LEGACY_OPTIMIZER_KEYS},
    **{f.name: ("performance", f.name) for f in dataclasses.fields(PerformanceOptions)},
    "deterministic_validation": ("validation", "deterministic"),
    "validation_seed": ("validation", "seed"),
}
AUTOENCODER_OPTION_GROUPS: dict[str, type] = {"optimization": AutoencoderOptimizationOptions}
AUTOENCODER_FLAT_OPTION_KEYS: dict[str, tuple[str, str]] = {
    **{f.name: ("optimization", f.name) for f in dataclasses.fields(AutoencoderOptimizationOptions)},
    **{name: ("optimization", name) for name in AUTOENCODER_LEGACY_OPTIMIZER_KEYS},
}


def move_legacy_optimizer_keys(optimization: Mapping[str, Any], legacy: Mapping[str, str]) -> dict[str, Any]:
    """`model.optimization` with its pre-config optimiser keys (`weight_decay`, `adam_betas`,
    `fused_optimizer`) moved into `optimizer` (`fused_optimizer: true` -> `fused: null`, auto: the
    fused kernel where the device has one, which is where `true` ran). Keys without `_target_` are
    merged over the module's default optimiser. Idempotent."""
    out = dict(optimization)
    moved = {legacy[k]: out.pop(k) for k in list(out) if k in legacy}
    if not moved:
        return out
    if moved.get("fused") is True:
        moved["fused"] = None
    current = out.get("optimizer")
    if current is None or isinstance(current, Mapping):
        out["optimizer"] = {**moved, **dict(current or {})}
    return out


@dataclass(frozen=True)
class OptionLayout:
    """A module's option groups, its flat (pre-group) keys and its optimiser's old keys: the module
    class declares which (``option_layout``), so old configs are read without naming classes here."""

    groups: Mapping[str, type]
    flat_keys: Mapping[str, tuple[str, str]]
    legacy_optimizer_keys: Mapping[str, str]


LDM_OPTIONS = OptionLayout(OPTION_GROUPS, FLAT_OPTION_KEYS, LEGACY_OPTIMIZER_KEYS)
AUTOENCODER_OPTIONS = OptionLayout(
    AUTOENCODER_OPTION_GROUPS, AUTOENCODER_FLAT_OPTION_KEYS, AUTOENCODER_LEGACY_OPTIMIZER_KEYS
)


def option_layout(model: Mapping[str, Any]) -> OptionLayout:
    """The layout the class a model config's ``_target_`` builds declares (``option_layout``); the LDM's
    for a config without one, or whose class cannot be imported (the start-up check names that)."""
    try:
        cls = get_object(str(model["_target_"]))
    except Exception:  # Hydra's import errors: ImportError, ValueError, AttributeError, KeyError
        return LDM_OPTIONS
    return getattr(cls, "option_layout", LDM_OPTIONS)


Options = TypeVar("Options")


def unknown_key_problem(cls: type, values: Mapping[str, Any], group: str) -> str | None:
    """The keys of `model.<group>` its dataclass does not have, named with the ones it does."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    return f"model.{group} has unknown key(s) {unknown}; model.{group} holds {known}" if unknown else None


def build_options(cls: type[Options], values: Mapping[str, Any] | Options | None, group: str) -> Options:
    """`model.<group>` as its dataclass; an unknown key is named with the keys the group has."""
    if isinstance(values, cls):
        return values
    values = dict(values or {})
    problem = unknown_key_problem(cls, values, group)
    if problem:
        raise ValueError(problem)
    return cls(**values)


def option_problems(model: Mapping[str, Any]) -> list[str]:
    """:func:`group_problems` of a model config in the layout its ``_target_``'s class declares."""
    return group_problems(model, option_layout(model))


def group_problems(model: Mapping[str, Any], layout: OptionLayout) -> list[str]:
    """Start-up check of a module's option groups: a flat option (e.g. `+model.base_learning_rate=...`)
    names its new place (the layout's old names), an unknown key in a group names the keys the group
    has, and the learning rate is positive."""
    groups, keys, legacy = layout.groups, layout.flat_keys, layout.legacy_optimizer_keys
    problems = [
        f"model.{name} moved to model.{group}.{key} (docs/architecture.md): set model.{group}.{key} instead"
        for name, (group, key) in keys.items()
        if name in model and name not in legacy
    ]
    problems += [
        f"model.{name} moved to model.optimization.optimizer.{new} (segldm/training/optimizers.py): set "
        f"model.optimization.optimizer.{new} instead"
        for name, new in legacy.items()
        if name in model or name in (model.get("optimization") or {})
    ]
    for group, cls in groups.items():
        if isinstance(model.get(group), Mapping):
            values = {k: v for k, v in model[group].items() if group != "optimization" or k not in legacy}
            problem = unknown_key_problem(cls, values, group)
            if problem:
                problems.append(problem)
    base_lr = dict(model.get("optimization") or {}).get("base_learning_rate")
    if base_lr is not None and base_lr <= 0:
        problems.append(f"model.optimization.base_learning_rate={base_lr} must be positive")
    return problems


def group_flat_options(model: Mapping[str, Any]) -> dict[str, Any]:
    """A model config in the flat layout (checkpoints and CompVis exports of older segldm) -> the
    grouped one; a value already in its group wins over a flat one; the optimiser's old keys move
    into `optimization.optimizer`. Idempotent."""
    out = copy.deepcopy(dict(model))
    layout = option_layout(model)
    for name, (group, key) in layout.flat_keys.items():
        if name in out:
            value = out.pop(name)
            out[group] = {**{key: value}, **dict(out.get(group) or {})}
    if isinstance(out.get("optimization"), Mapping):
        out["optimization"] = move_legacy_optimizer_keys(out["optimization"], layout.legacy_optimizer_keys)
    return out


def flatten_options(model: Mapping[str, Any]) -> dict[str, Any]:
    """The grouped options of a model config under their flat (CompVis) names, for readers that name
    one value (`timesteps`, `base_learning_rate`, ...); the groups' defaults fill what is not set."""
    out: dict[str, Any] = {}
    for name, (group, key) in FLAT_OPTION_KEYS.items():
        if name in LEGACY_OPTIMIZER_KEYS:
            continue
        defaults = OPTION_GROUPS[group]()
        out[name] = dict(model.get(group) or {}).get(key, getattr(defaults, key))
    optimizer = dict(out.pop("optimizer", None) or {})
    if "_target_" not in optimizer:
        optimizer = {**ADAMW, **optimizer}
    for name, key in LEGACY_OPTIMIZER_KEYS.items():  # AdamW's settings under their old flat names
        if key in optimizer:
            out[name] = optimizer[key]
    return out
