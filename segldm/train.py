"""`python -m segldm.train`: compose the config, build data/model/callbacks/loggers, fit.

The model group decides the stage: `model=ldm_seg` trains the LDM on a frozen first stage,
`model=autoencoder` trains the VQ first stage itself.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

import segldm  # noqa: F401  (registers the config resolvers)
from segldm.config.hardware import precision_message
from segldm.config.locations import hydra_config_path
from segldm.config.run_folder import is_throwaway
from segldm.config.startup import reports_startup_errors
from segldm.data.precheck import precheck_data
from segldm.runtime.checks import validate_config
from segldm.runtime.lightning_state import check_lightning_internals
from segldm.runtime.loading import apply_init_from
from segldm.runtime.preemption import DEFAULT_SIGNALS, PreemptionCheckpoint, exit_on_signals
from segldm.runtime.resume import plan_resume, reliability_callbacks, write_run_record
from segldm.runtime.run_lock import run_folder_lock
from segldm.sweeps.jobs import SweepJob, find_finished, record_finished, reuse_finished, tag_runs
from segldm.tracking.logger import (
    build_loggers,
    log_checkpoints,
    log_run_metadata,
    mlflow_loggers,
    runs_ended,
    sweep_logger_note,
    tracking_callbacks,
)

log = logging.getLogger(__name__)


def instantiate_callbacks(cfg: DictConfig) -> list[L.Callback]:
    callbacks_cfg = cfg.get("callbacks") or {}
    return [instantiate(c) for c in callbacks_cfg.values() if isinstance(c, DictConfig) and "_target_" in c]


def without_checkpointing(callbacks: list[L.Callback]) -> list[L.Callback]:
    """A throw-away run's callbacks: nothing that writes a checkpoint."""
    return [c for c in callbacks if not isinstance(c, ModelCheckpoint | PreemptionCheckpoint)]


def train(cfg: DictConfig, sweep_job: SweepJob | None = None) -> dict[str, Any]:
    """Fit the configured model; returns the final metrics (and where things were written).

    Every check that needs no model runs first. The run folder is then locked for this process
    (a second training into it is refused), and every MLflow run opened here is ended FINISHED,
    FAILED or KILLED however the call ends.
    """
    validate_config(cfg)
    precheck_data(cfg.data)  # data.precheck: bad files fail here, before anything is built
    output_dir = Path(cfg.paths.output_dir)
    loggers: list[Logger] = []
    with run_folder_lock(output_dir), runs_ended(loggers):
        return _train(cfg, sweep_job, output_dir, loggers)


def _train(
    cfg: DictConfig, sweep_job: SweepJob | None, output_dir: Path, loggers: list[Logger]
) -> dict[str, Any]:
    started = time.monotonic()
    throwaway = is_throwaway(cfg)
    signals = (cfg.get("reliability") or {}).get("checkpoint_signals", list(DEFAULT_SIGNALS))
    with exit_on_signals(signals):  # until the training loop takes the signals over
        # resume=auto / ckpt_path: a checked checkpoint (and MLflow run), before anything is built
        plan = plan_resume(cfg)
        if plan.reason != "new run":
            log.info("%s", plan.reason)
        if throwaway:
            log.info(
                "trainer.fast_dev_run: a throw-away run in %s (no checkpoints, no MLflow run)", output_dir
            )
        else:
            loggers.extend(build_loggers(cfg, run_id=plan.mlflow_run_id))  # an unreachable server fails here
        L.seed_everything(cfg.seed, workers=True)
        output_dir.mkdir(parents=True, exist_ok=True)

        datamodule = instantiate(cfg.data)
        model = instantiate(cfg.model, scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None)
        model.segldm_config = OmegaConf.to_container(cfg, resolve=True)
        model.segldm_config.pop("hydra", None)
        auto = cfg.get("resume") == "auto" or cfg.get("ckpt_path") == "last"
        init_cfg = {  # a resumed run takes its weights from the checkpoint; init_from only starts a run
            "init_from": None if auto and plan.ckpt_path else cfg.get("init_from"),
            "ckpt_path": None if auto else cfg.get("ckpt_path"),
            "trust_checkpoint": cfg.get("trust_checkpoint", False),
        }
        apply_init_from(model, init_cfg)  # init_from=<ckpt>: its weights (fresh optimizer), strictly

        callbacks = instantiate_callbacks(cfg) + reliability_callbacks(cfg) + tracking_callbacks(loggers)
        if not loggers:  # Lightning refuses a LearningRateMonitor without a logger
            callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
        trainer_kwargs: dict[str, Any] = {"callbacks": callbacks, "logger": loggers or False}
        if throwaway:
            trainer_kwargs.update(callbacks=without_checkpointing(callbacks), enable_checkpointing=False)
        trainer: L.Trainer = instantiate(cfg.trainer, **trainer_kwargs)
        check_lightning_internals(trainer)  # exact resume reads a few of them; before any step
        log.info("%s", precision_message(cfg.trainer))

        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
        log_run_metadata(loggers, cfg, overrides, str(output_dir))
        runs = mlflow_loggers(loggers)
        if runs and trainer.is_global_zero:  # resume=auto continues this MLflow run, even before a checkpoint
            write_run_record(output_dir, str(runs[0].run_id), str(runs[0]._tracking_uri))
            if plan.ckpt_path:
                runs[0].experiment.set_tag(
                    runs[0].run_id, "segldm.resumed_from", f"{plan.ckpt_path} (step {plan.global_step})"
                )
        if sweep_job is not None:
            tag_runs(loggers, sweep_job)

    trainer.fit(model, datamodule=datamodule, ckpt_path=plan.ckpt_path)

    checkpoint = trainer.checkpoint_callback
    last = getattr(checkpoint, "last_model_path", None) or None
    best = getattr(checkpoint, "best_model_path", None) or None
    log_checkpoints(loggers, last, best)
    metrics = {
        k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1
    }
    result: dict[str, Any] = {"metrics": metrics, "output_dir": str(output_dir), "last_checkpoint": last}
    if plan.ckpt_path:
        result["resumed_from"] = plan.ckpt_path
    if runs:
        result["mlflow_run_id"] = runs[0].run_id
        result["tracking_uri"] = runs[0]._tracking_uri
    if sweep_job is not None and trainer.is_global_zero:
        record_finished(sweep_job, result, time.monotonic() - started)
    report(result)
    return result


def report(result: dict[str, Any]) -> None:
    """Tell the user where to look."""
    lines = [f"outputs:         {result['output_dir']}"]
    if result.get("resumed_from"):
        lines.append(f"resumed from:    {result['resumed_from']}")
    if result.get("last_checkpoint"):
        lines.append(f"last checkpoint: {result['last_checkpoint']}")
    if result.get("mlflow_run_id"):
        lines.append(f"MLflow run:      {result['mlflow_run_id']} ({result['tracking_uri']})")
        if str(result["tracking_uri"]).startswith("sqlite"):
            lines.append(f"open the UI:     mlflow ui --backend-store-uri {result['tracking_uri']}")
    print("\n".join(lines), flush=True)


@hydra.main(version_base="1.3", config_path=hydra_config_path(), config_name="train")
@reports_startup_errors
def main(cfg: DictConfig) -> float | None:
    """Train; return the sweep objective (`sweep.objective`, default val/loss) to Hydra's sweepers.

    In a multirun, a job whose overrides already finished in the same sweep is not trained again
    (segldm.sweeps): it returns the recorded objective.
    """
    sweep_job = SweepJob.from_hydra(cfg)
    note = sweep_logger_note(cfg) if sweep_job is not None else None
    if note:  # a sweep works with any logger; what it loses without MLflow is said at start-up
        log.warning("%s", note)
    if sweep_job is not None and (cfg.get("sweep") or {}).get("skip_finished", True):
        record = find_finished(sweep_job, cfg)
        if record is not None:
            return reuse_finished(sweep_job, record)
    result = train(cfg, sweep_job)
    objective = (cfg.get("sweep") or {}).get("objective") or "val/loss"
    value = result["metrics"].get(objective)
    if value is None and sweep_job is not None:
        log.warning(
            "sweep.objective=%s was not logged by this job (it logged %s); the sweeper gets None. Validate "
            "before the end (trainer.val_check_interval <= trainer.max_steps) or choose another sweep.objective",
            objective,
            sorted(result["metrics"]),
        )
    return value


if __name__ == "__main__":
    main()
