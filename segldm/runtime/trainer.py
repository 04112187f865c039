"""The Trainer of a training run, with every callback it gets listed in one place.

A run's callbacks come from the config (``callbacks``: checkpoints, sample grids, LR monitor, ...),
from ``reliability`` (always added, even with ``callbacks=none``: the exact-resume state, the
pre-emption checkpoint, the gradient guard) and from its loggers (MLflow batches flushed before each
checkpoint). :func:`run_callbacks` lists them and applies the two rules that remove some: no
LearningRateMonitor without a logger (Lightning refuses it), no checkpoint writer in a throw-away run.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

from segldm.config.hardware import precision_message
from segldm.runtime.lightning_state import check_lightning_internals
from segldm.runtime.preemption import PreemptionCheckpoint, checkpoint_signals
from segldm.runtime.resume import TrainingState
from segldm.tracking.logger import tracking_callbacks
from segldm.training.guards import FiniteGradients

log = logging.getLogger(__name__)


def configured_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The config's ``callbacks`` group, each entry with a ``_target_`` instantiated."""
    callbacks_cfg = cfg.get("callbacks") or {}
    return [instantiate(c) for c in callbacks_cfg.values() if isinstance(c, DictConfig) and "_target_" in c]


def reliability_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The callbacks ``segldm.train`` always adds (``reliability`` in conf/train.yaml), even with callbacks=none."""
    callbacks: list[L.Callback] = [TrainingState()]
    signals = checkpoint_signals(cfg)
    if signals:
        callbacks.append(PreemptionCheckpoint(signals))
    if (cfg.get("reliability") or {}).get("check_gradients", True):
        callbacks.append(FiniteGradients())
    return callbacks


def run_callbacks(cfg: DictConfig, loggers: list[Logger], throwaway: bool) -> list[L.Callback]:
    """Every callback of a training run: the config's, the reliability ones, and what the loggers need."""
    callbacks = configured_callbacks(cfg) + reliability_callbacks(cfg) + tracking_callbacks(loggers)
    if not loggers:  # Lightning refuses a LearningRateMonitor without a logger
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if throwaway:  # nobody resumes a throw-away run: nothing writes a checkpoint
        callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint | PreemptionCheckpoint)]
    return callbacks


def build_trainer(cfg: DictConfig, loggers: list[Logger], throwaway: bool) -> L.Trainer:
    """``cfg.trainer`` with the run's callbacks and loggers, checked for the Lightning internals resume reads."""
    settings: dict[str, Any] = {
        "callbacks": run_callbacks(cfg, loggers, throwaway),
        "logger": loggers or False,
    }
    if throwaway:
        settings["enable_checkpointing"] = False
    trainer: L.Trainer = instantiate(cfg.trainer, **settings)
    check_lightning_internals(trainer)  # exact resume reads a few of them; before any step
    log.info("%s", precision_message(cfg.trainer))
    return trainer


__all__ = ["build_trainer", "configured_callbacks", "reliability_callbacks", "run_callbacks"]
