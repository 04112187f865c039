"""Speed and memory paths of a training step that compute the reference's function with less work.

Each is switched by a `model.*` key (conf/model/ldm_seg.yaml) and checked against the reference
path in tests/bench/test_perf_equivalence.py; `make bench` (experiments/bench/) measures what each buys.

* the fused label-map conditioning lives with the condition (:mod:`segldm.condition`).
* :func:`to_channels_last` / :func:`compile_module`: memory format and torch.compile of a module
  in place (state_dict keys unchanged, so checkpoints stay CompVis-compatible).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def to_channels_last(module: nn.Module) -> nn.Module:
    """Convert 4-D parameters and buffers to channels_last in place (Parameter objects kept)."""
    return module.to(memory_format=torch.channels_last)


def compile_options(setting: bool | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """`model.performance.compile*` as torch.compile's keyword arguments: None (off), {} (true) or the dict."""
    if not setting:
        return None
    return dict(setting) if isinstance(setting, Mapping) else {}


def compile_module(module: nn.Module, options: dict[str, Any] | None = None) -> nn.Module:
    """`module.compile(**options)` in place: forward goes through torch.compile, keys unchanged."""
    module.compile(**(options or {}))
    return module
