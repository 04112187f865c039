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
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

import segldm  # noqa: F401  (registers the config resolvers)
from segldm.config.hardware import precision_message
from segldm.config.locations import hydra_config_path
from segldm.config.startup import reports_startup_errors
from segldm.data.precheck import precheck_data
from segldm.runtime.checks import validate_config
from segldm.runtime.lightning_state import check_lightning_internals
from segldm.runtime.loading import init_from_checkpoint
from segldm.runtime.preemption import PreemptionCheckpoint, checkpoint_signals, exit_on_signals
from segldm.runtime.resume import reliability_callbacks
from segldm.runtime.run_lock import run_folder_lock
from segldm.runtime.run_plan import RunPlan, plan_run
from segldm.sweeps.jobs import SweepJob, find_finished, record_finished, reuse_finished, tag_runs
from segldm.tracking.logger import runs_ended, sweep_logger_note, tracking_callbacks

log = logging.getLogger(__name__)


def train(cfg: DictConfig, sweep_job: SweepJob | None = None) -> dict[str, Any]:
    """Fit the configured model; returns the final metrics (and where things were written).

    Every check that needs no model runs first. The run folder is then locked for this process
    (a second training into it is refused), and every MLflow run opened here is ended FINISHED,
    FAILED or KILLED however the call ends.
    """
    validate_config(cfg)
    precheck_data(cfg.data)  # data.precheck: bad files fail here, before anything is built
    loggers: list[Logger] = []
    with run_folder_lock(Path(cfg.paths.output_dir)), runs_ended(loggers):
        started = time.monotonic()
        with exit_on_signals(checkpoint_signals(cfg)):  # until the training loop takes the signals over
            plan = plan_run(cfg)  # fresh, resume or init_from: decided once, before anything is built
            loggers.extend(plan.loggers(cfg))  # continues the plan's MLflow run
            trainer, model, datamodule = build(cfg, plan, loggers)
            run = plan.start_tracking(cfg, loggers, trainer.is_global_zero)
            if sweep_job is not None:
                tag_runs(loggers, sweep_job)
        trainer.fit(model, datamodule=datamodule, ckpt_path=plan.ckpt_path)
        result = plan.outcome(trainer, loggers, run)
        if sweep_job is not None and trainer.is_global_zero:
            record_finished(sweep_job, result, time.monotonic() - started)
        report(result)
    return result


def build(
    cfg: DictConfig, plan: RunPlan, loggers: list[Logger]
) -> tuple[L.Trainer, L.LightningModule, L.LightningDataModule]:
    """The seeded data, the model (with the plan's init_from weights) and the Trainer of a planned run."""
    L.seed_everything(cfg.seed, workers=True)
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None)
    model.segldm_config = OmegaConf.to_container(cfg, resolve=True)
    model.segldm_config.pop("hydra", None)
    if plan.init_from:  # its weights (fresh optimizer), strictly
        init_from_checkpoint(model, plan.init_from, trust_checkpoint=plan.trust_checkpoint)
    settings: dict[str, Any] = {
        "callbacks": run_callbacks(cfg, loggers, plan.throwaway),
        "logger": loggers or False,
    }
    if plan.throwaway:
        settings["enable_checkpointing"] = False
    trainer: L.Trainer = instantiate(cfg.trainer, **settings)
    check_lightning_internals(trainer)  # exact resume reads a few of them; before any step
    log.info("%s", precision_message(cfg.trainer))
    return trainer, model, datamodule


def run_callbacks(cfg: DictConfig, loggers: list[Logger], throwaway: bool) -> list[L.Callback]:
    """Every callback of a training run, listed here only, and the two rules that remove some.

    The config's (``callbacks``: checkpoints, sample grids, LR monitor, ...), the reliability ones
    (always added, even with callbacks=none: exact-resume state, pre-emption checkpoint, gradient
    guard) and what the loggers need (MLflow batches flushed before each checkpoint).
    """
    configured = [
        instantiate(c)
        for c in (cfg.get("callbacks") or {}).values()
        if isinstance(c, DictConfig) and "_target_" in c
    ]
    callbacks = configured + reliability_callbacks(cfg) + tracking_callbacks(loggers)
    if not loggers:  # Lightning refuses a LearningRateMonitor without a logger
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if throwaway:  # nobody resumes a throw-away run: nothing writes a checkpoint
        callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint | PreemptionCheckpoint)]
    return callbacks


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
