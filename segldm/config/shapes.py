"""Declared shapes of config values: a scalar where a group of settings belongs, or text where a number
or a switch belongs, fails before any work, naming the key and what it expects.

The shape of every key is the one the config files give it: the same command composed with its
config-group choices only (``experiment=...``, ``data=...``) and none of its value overrides is the
reference. Hydra's struct mode already refuses unknown keys (``Key 'x' is not in struct``); this
adds the values whose type does not fit (``eval.bootstrap=0`` used to fail a minute later with
``'int' object has no attribute 'draws'``). Keys whose reference value is null or an interpolation
accept anything; so do keys listed as taking either a switch or a group (``OPEN_SHAPES``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

# keys whose value may be a switch or a group of settings (model.performance.compile: true or {mode: ...})
OPEN_SHAPES = ("compile", "compile_first_stage")


def _kind(value: Any) -> str:
    if isinstance(value, dict | DictConfig):
        return "group"
    if isinstance(value, list | tuple | ListConfig):
        return "list"
    if isinstance(value, bool):
        return "switch"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "text"
    return "other"


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def _example(reference: dict[str, Any], key: str) -> str:
    first = next(iter(reference), None)
    if first is None:
        return ""
    return f"; set its keys one by one, e.g. {key}.{first}={reference[first]}"


def shape_problems(actual: Any, reference: Any, prefix: str = "") -> list[str]:
    """Where ``actual`` (a config as a container, unresolved) does not have ``reference``'s shapes."""
    problems: list[str] = []
    if not isinstance(actual, dict) or not isinstance(reference, dict):
        return problems
    for key, expected in reference.items():
        if key not in actual or expected is None or _is_interpolation(expected):
            continue
        value, name = actual[key], f"{prefix}{key}"
        if value is None or _is_interpolation(value) or key in OPEN_SHAPES:
            continue
        want, got = _kind(expected), _kind(value)
        if want == "group":
            if got != "group":
                problems.append(
                    f"{name}={value!r} is a {got}, but {name} is a group of settings ({', '.join(map(str, expected))})"
                    f"{_example(expected, name)}"
                )
            else:
                problems += shape_problems(value, expected, f"{name}.")
        elif want in ("number", "switch") and got in ("text", "group", "list"):
            problems.append(
                f"{name}={value!r} is a {got}, but {name} takes a {want} (like its default, {expected!r})"
            )
        elif want == "list" and got == "group":
            problems.append(
                f"{name} is a group of settings, but it takes a list (like its default, {expected!r})"
            )
    return problems


def group_choice_overrides(overrides: Sequence[str], groups: Sequence[str]) -> list[str]:
    """The overrides of ``overrides`` that choose a config group option (``data=folder``, ``+experiment=x``)."""
    chosen = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in groups:
            chosen.append(override)
    return chosen


def check_shapes(cfg: DictConfig, skip: Sequence[str] = ("hydra",)) -> list[str]:
    """The shape problems of ``cfg`` against the config files of the running Hydra app ([] outside one)."""
    if not HydraConfig.initialized() or not GlobalHydra.instance().is_initialized():
        return []
    hydra_cfg = HydraConfig.get()
    if not hydra_cfg.job.config_name:
        return []
    overrides = group_choice_overrides(list(hydra_cfg.overrides.task), list(hydra_cfg.runtime.choices))
    reference = compose(config_name=hydra_cfg.job.config_name, overrides=overrides)
    actual = OmegaConf.to_container(cfg, resolve=False)
    expected = OmegaConf.to_container(reference, resolve=False)
    for key in skip:
        actual.pop(key, None)  # type: ignore[union-attr]
        expected.pop(key, None)  # type: ignore[union-attr]
    return shape_problems(actual, expected)


__all__ = ["OPEN_SHAPES", "check_shapes", "group_choice_overrides", "shape_problems"]
