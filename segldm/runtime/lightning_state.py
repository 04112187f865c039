"""The Lightning internals exact resume and pre-emption read: whether a validation follows this step,
and the step metrics Lightning has not sent yet. A Lightning release without them stops the run at
start-up (:func:`check_lightning_internals`) instead of resuming it silently inexactly."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import MLFlowLogger

log = logging.getLogger(__name__)


# Lightning internals that exact resume reads (validation_follows, pending_step_metrics): a release
# without them must stop the run at start-up, not resume it silently inexactly.
LIGHTNING_INTERNALS: tuple[tuple[str, str], ...] = (
    ("trainer.fit_loop", "_data_fetcher"),
    ("trainer.fit_loop.epoch_loop", "_should_check_val_fx"),
    ("trainer.fit_loop.epoch_loop", "_batches_that_stepped"),
    ("trainer", "_logger_connector"),
    ("trainer._logger_connector", "should_update_logs"),
    ("trainer._logger_connector", "metrics"),
    ("trainer", "_results"),
)


def check_lightning_internals(trainer: L.Trainer) -> None:
    """Raise RuntimeError, naming what is missing, when this Lightning lacks what exact resume reads."""
    missing = []
    for owner_path, name in LIGHTNING_INTERNALS:
        owner: Any = trainer
        for part in owner_path.split(".")[1:]:
            owner = getattr(owner, part, None)
        if owner is None or not hasattr(type(owner), name) and name not in vars(owner):
            missing.append(f"{owner_path}.{name}")
    if missing:
        raise RuntimeError(
            f"lightning {L.__version__} lacks {', '.join(missing)}, which segldm's exact resume reads "
            "(segldm/runtime/resume.py, written against lightning 2.6): install the pinned version "
            "(pip install -e . gives lightning==2.6.6)"
        )


def validation_follows(trainer: L.Trainer) -> bool:
    """Whether Lightning validates right after the current training batch (called in on_train_batch_end).

    Lightning's own decision (a private method of its epoch loop, lightning 2.6); time-based
    validation intervals are unpredictable and answer False.
    """
    loop = trainer.fit_loop
    if getattr(trainer, "_val_check_time_interval", None) is not None or loop._data_fetcher is None:
        return False
    return bool(loop.epoch_loop._should_check_val_fx(loop._data_fetcher))


def pending_step_metrics(trainer: L.Trainer) -> dict[str, Any] | None:
    """The current step's metrics Lightning will send to the loggers after on_train_batch_end.

    A checkpoint written in on_train_batch_end precedes that logging; a run killed in between
    would never log them, so they travel in the checkpoint (lightning 2.6 internals).
    """
    connector = trainer._logger_connector
    if not trainer.loggers or not connector.should_update_logs or trainer._results is None:
        return None
    metrics = {
        k: float(v) for k, v in connector.metrics["log"].items() if torch.is_tensor(v) and v.numel() == 1
    }
    if not metrics:
        return None
    metrics.setdefault("epoch", float(trainer.current_epoch))
    return {"step": int(trainer.fit_loop.epoch_loop._batches_that_stepped), "metrics": metrics}


def log_missing_metrics(trainer: L.Trainer, pending: Mapping[str, Any]) -> None:
    """Log ``pending`` step metrics that the loggers do not hold yet (MLflow: checked against the history)."""
    step, metrics = int(pending["step"]), dict(pending["metrics"])
    for logger in trainer.loggers:
        todo = metrics
        if isinstance(logger, MLFlowLogger):
            client, run_id = logger.experiment, logger.run_id
            todo = {
                k: v
                for k, v in metrics.items()
                if not any(m.step == step for m in (client.get_metric_history(run_id, k) or []))
            }
        if todo:
            logger.log_metrics(todo, step=step)
