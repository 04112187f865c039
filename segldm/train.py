"""`python -m segldm.train`: compose the config, build data/model/callbacks/loggers, fit.

The model group decides the stage: `model=ldm_seg` trains the LDM on a frozen first stage,
`model=autoencoder` trains the VQ first stage itself.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

import segldm  # noqa: F401  (registers the config resolvers)
from segldm.checkpoints import apply_init_from
from segldm.config_checks import validate_config
from segldm.tracking import build_loggers, log_checkpoints, log_run_metadata, mlflow_loggers

log = logging.getLogger(__name__)


def instantiate_callbacks(cfg: DictConfig) -> list[L.Callback]:
    callbacks_cfg = cfg.get("callbacks") or {}
    return [instantiate(c) for c in callbacks_cfg.values() if isinstance(c, DictConfig) and "_target_" in c]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit the configured model; returns the final metrics (and where things were written)."""
    validate_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None)
    model.segldm_config = OmegaConf.to_container(cfg, resolve=True)
    model.segldm_config.pop("hydra", None)
    apply_init_from(model, cfg)  # init_from=<ckpt>: start from its weights (fresh optimizer), strictly

    loggers = build_loggers(cfg)
    callbacks = instantiate_callbacks(cfg)
    if not loggers:  # Lightning refuses a LearningRateMonitor without a logger
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    log_run_metadata(loggers, cfg, overrides, str(output_dir))

    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    checkpoint = trainer.checkpoint_callback
    last = getattr(checkpoint, "last_model_path", None) or None
    best = getattr(checkpoint, "best_model_path", None) or None
    log_checkpoints(loggers, last, best)
    metrics = {
        k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1
    }
    result: dict[str, Any] = {"metrics": metrics, "output_dir": str(output_dir), "last_checkpoint": last}
    runs = mlflow_loggers(loggers)
    if runs:
        result["mlflow_run_id"] = runs[0].run_id
        result["tracking_uri"] = runs[0]._tracking_uri
    report(result)
    return result


def report(result: dict[str, Any]) -> None:
    """Tell the user where to look."""
    lines = [f"outputs:         {result['output_dir']}"]
    if result.get("last_checkpoint"):
        lines.append(f"last checkpoint: {result['last_checkpoint']}")
    if result.get("mlflow_run_id"):
        lines.append(f"MLflow run:      {result['mlflow_run_id']} ({result['tracking_uri']})")
        if str(result["tracking_uri"]).startswith("sqlite"):
            lines.append(f"open the UI:     mlflow ui --backend-store-uri {result['tracking_uri']}")
    print("\n".join(lines), flush=True)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    result = train(cfg)
    return result["metrics"].get("val/loss")


if __name__ == "__main__":
    main()
