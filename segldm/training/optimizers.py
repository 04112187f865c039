"""The optimiser as config: `model.optimization.optimizer` is a `_partial_` torch optimiser.

The module passes the parameters and the effective learning rate (`base_learning_rate`, scaled as
CompVis does); everything else (betas, weight decay, eps, the kernel) is the config's. ``fused``:

- ``null`` (auto): torch's fused kernel when every parameter sits on a device that has one (CUDA and,
  in torch >= 2.4, CPU), so a config runs on any device;
- ``true``: the fused kernel (torch raises on a device without one);
- ``false``: torch's unfused default (foreach on CUDA, the per-tensor loop on CPU); torch's own
  ``fused=False`` would also turn foreach off, so ``false`` is not passed on.

Any torch optimiser works (`_target_: torch.optim.SGD`, ...); Lightning's `LearningRateMonitor`
names the lr metric after its class (`lr-AdamW`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from segldm.errors import StartupError

OptimizerFactory = Callable[..., torch.optim.Optimizer]

# What `model=ldm_seg` trained with before the optimiser was config (conf/model/ldm_seg.yaml).
ADAMW: dict[str, Any] = {
    "_target_": "torch.optim.AdamW",
    "_partial_": True,
    "betas": [0.9, 0.999],
    "weight_decay": 0.01,
    "fused": None,
}
# taming's first-stage Adam (conf/model/autoencoder.yaml); torch's kernel choice as before
TAMING_ADAM: dict[str, Any] = {"_target_": "torch.optim.Adam", "_partial_": True, "betas": [0.5, 0.9]}


def optimizer_factory(
    spec: Mapping[str, Any] | OptimizerFactory | None, default: Mapping[str, Any], key: str
) -> OptimizerFactory:
    """``spec`` as ``factory(params, lr=...)``: a config (a `_target_` node, or keys merged over
    ``default`` when it has none: checkpoints from before the optimiser was config) or a callable
    (what Hydra's recursive instantiate makes of a `_partial_` node)."""
    if spec is None or isinstance(spec, Mapping):
        values = dict(spec or {})
        node = values if "_target_" in values else {**default, **values}
        if node.get("_partial_") is False:
            raise StartupError(
                f"{key}._partial_=false: the optimiser is built by the module with its parameters and "
                f"learning rate; set {key}._partial_=true"
            )
        from hydra.utils import instantiate

        spec = instantiate({**node, "_partial_": True}, _convert_="all")
    if not callable(spec):
        raise StartupError(
            f"{key} must be a torch optimiser config with _target_ and _partial_: true, got {spec!r}"
        )
    keywords = settings(spec)
    if "lr" in keywords:
        raise StartupError(
            f"{key}.lr={keywords['lr']}: the learning rate is model.optimization.base_learning_rate (scaled "
            "by batch size when model.optimization.scale_lr); remove lr from the optimiser config"
        )
    return spec


def settings(factory: OptimizerFactory) -> dict[str, Any]:
    """The keyword arguments a partial optimiser config fixes (betas, weight_decay, fused, ...)."""
    return dict(factory.keywords) if isinstance(factory, functools.partial) else {}


def fused_available(params: Iterable[torch.Tensor]) -> bool:
    """Whether torch has a fused optimiser kernel for every parameter's device and dtype."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # a torch that moved the helper: CUDA has the kernels since 2.0
        devices = {"cuda"}
    params = list(params)
    return bool(params) and all(p.device.type in devices and p.is_floating_point() for p in params)


def build_optimizer(factory: OptimizerFactory, params: Iterable[Any], lr: float) -> torch.optim.Optimizer:
    """``factory(params, lr=lr)`` with ``fused`` resolved (null: auto, false: torch's unfused default)."""
    params = list(params)
    keywords = settings(factory)
    extra: dict[str, Any] = {}
    if isinstance(keywords.get("betas"), list):  # a config's list, as the tuple torch's default is
        extra["betas"] = tuple(keywords["betas"])
    if "fused" in keywords:
        fused = keywords["fused"]
        if fused is None:
            extra["fused"] = True if fused_available(_tensors(params)) else None
        elif fused is False:
            extra["fused"] = None  # torch's fused=False also disables foreach; None is its default choice
    return factory(params, lr=lr, **extra)


def _tensors(params: list[Any]) -> list[torch.Tensor]:
    """The tensors of a parameter list or of parameter groups."""
    out: list[torch.Tensor] = []
    for p in params:
        out.extend(p["params"] if isinstance(p, Mapping) else [p])
    return out
