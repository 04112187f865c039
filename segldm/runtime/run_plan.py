"""How a training run starts, decided once before anything is built: fresh, resumed, or from weights.

:func:`plan_run` reads ``resume``, ``ckpt_path``, ``init_from`` and ``trainer.fast_dev_run`` and
decides:

* **resume**: ``resume=auto`` / ``ckpt_path=last`` (the rule is
  :func:`segldm.config.run_folder.resumes_automatically`, which also picks the run folder) found a
  checkpoint in the run folder, or ``ckpt_path=<file>`` names one; either is read and checked
  completely (:func:`segldm.runtime.resume.plan_resume`). Weights, optimizer, step and data position come from it, and
  the MLflow run it recorded is continued; ``init_from`` is not loaded (it only starts runs).
* **init_from**: ``init_from=<ckpt>`` and nothing to resume: a new run from that checkpoint's weights
  (fresh optimizer, step 0).
* **fresh**: neither.

``init_from`` together with ``ckpt_path=<file>`` is refused (one resumes a run, the other starts one).
Everything the run records about how it started is reached through the plan: the MLflow run to
continue (:meth:`RunPlan.loggers`), the run folder's record of that run and the
``segldm.resumed_from`` tag (:meth:`RunPlan.start_tracking`), and the result's ``resumed_from``,
``mlflow_run_id`` and ``tracking_uri`` (:meth:`RunPlan.outcome`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

from segldm.config.run_folder import is_throwaway
from segldm.runtime.resume import plan_resume, write_run_record
from segldm.storage.checkpoint_files import CheckpointError
from segldm.tracking.logger import (
    TrackedRun,
    build_loggers,
    log_checkpoints,
    log_run_metadata,
    task_overrides,
    tracked_run,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    """The decision :func:`plan_run` makes once: which checkpoint to resume, which weights to start from."""

    output_dir: Path
    throwaway: bool = False  # trainer.fast_dev_run: no checkpoints, no MLflow run
    ckpt_path: str | None = None  # the checked checkpoint to resume (None: a new run)
    global_step: int | None = None  # its step
    mlflow_run_id: str | None = None  # the MLflow run to continue (also without a checkpoint yet)
    init_from: str | None = None  # weights a new run starts from
    trust_checkpoint: bool = False
    reason: str = "new run"

    @property
    def start(self) -> Literal["fresh", "resume", "init_from"]:
        if self.ckpt_path:
            return "resume"
        return "init_from" if self.init_from else "fresh"

    def loggers(self, cfg: DictConfig) -> list[Logger]:
        """The run's loggers (an unreachable tracking server fails here); none for a throw-away run."""
        return [] if self.throwaway else build_loggers(cfg, run_id=self.mlflow_run_id)

    def start_tracking(
        self, cfg: DictConfig, loggers: list[Logger], is_global_zero: bool
    ) -> TrackedRun | None:
        """Log the run's config and tags; on global rank 0 record its MLflow run in the run folder (so
        resume=auto continues it, even before the first checkpoint) and tag where it resumed from."""
        log_run_metadata(loggers, cfg, task_overrides(), str(self.output_dir))
        run = tracked_run(loggers) if is_global_zero else None
        if run is not None:
            write_run_record(self.output_dir, run.run_id, run.tracking_uri)
            if self.ckpt_path:
                run.set_tag("segldm.resumed_from", f"{self.ckpt_path} (step {self.global_step})")
        return run

    def outcome(self, trainer: L.Trainer, loggers: list[Logger], run: TrackedRun | None) -> dict[str, Any]:
        """The fitted run's final metrics, folder and checkpoints (tagged on MLflow), resume and MLflow run."""
        checkpoint = trainer.checkpoint_callback
        last = getattr(checkpoint, "last_model_path", None) or None
        best = getattr(checkpoint, "best_model_path", None) or None
        log_checkpoints(loggers, last, best)
        metrics = {
            k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1
        }
        result: dict[str, Any] = {
            "metrics": metrics,
            "output_dir": str(self.output_dir),
            "last_checkpoint": last,
        }
        if self.ckpt_path:
            result["resumed_from"] = self.ckpt_path
        if run is not None:
            result.update(mlflow_run_id=run.run_id, tracking_uri=run.tracking_uri)
        return result


def plan_run(cfg: DictConfig) -> RunPlan:
    """Decide fresh / resume / init_from for ``cfg`` (checkpoints read and checked here), and say which."""
    init_from, ckpt_path = cfg.get("init_from"), cfg.get("ckpt_path")
    if init_from and ckpt_path not in (None, "last"):
        raise CheckpointError(
            f"init_from={init_from} and ckpt_path={ckpt_path} are both set: ckpt_path resumes a run (weights, "
            "optimizer, step), init_from starts a new one from weights; set only one"
        )
    resume = plan_resume(cfg)
    plan = RunPlan(
        output_dir=Path(cfg.paths.output_dir),
        throwaway=is_throwaway(cfg),
        ckpt_path=resume.ckpt_path,
        global_step=resume.global_step,
        mlflow_run_id=resume.mlflow_run_id,
        init_from=None if resume.ckpt_path else (str(init_from) if init_from else None),
        trust_checkpoint=bool(cfg.get("trust_checkpoint", False)),
        reason=resume.reason,
    )
    if plan.reason != "new run":
        log.info("%s", plan.reason)
    if init_from and plan.start == "resume":
        log.info("init_from=%s is not loaded: the resumed checkpoint holds the run's weights", init_from)
    if plan.throwaway:
        log.info(
            "trainer.fast_dev_run: a throw-away run in %s (no checkpoints, no MLflow run)", plan.output_dir
        )
    return plan


__all__ = ["RunPlan", "plan_run"]
