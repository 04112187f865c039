"""Sample grids into every logger of the run, through each one's own image API, with their step.

- MLflow: ``log_image(key=..., step=...)`` (the run's Images view gets a step slider) and the PNG
  as an artifact under ``<kind>/`` (a stable path to download);
- TensorBoard: ``add_image(kind, image, global_step=step)`` (the Images tab's slider);
- Weights & Biases: ``wandb.Image`` through Lightning's ``WandbLogger.log_image`` at the step;
- CSV: the PNG stays in the run folder; ``images.csv`` beside ``metrics.csv`` lists step, key and path.

A logger that fails to take an image gets a warning, never a failed run: the grid is on disk.
"""

from __future__ import annotations

import csv
import logging
import warnings
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from PIL import Image

log = logging.getLogger(__name__)

IMAGES_CSV = "images.csv"


def log_image_file(trainer: L.Trainer, path: Path, key: str, step: int) -> None:
    """The PNG at ``path`` as image ``key`` at ``step`` in each of the trainer's loggers."""
    for logger in trainer.loggers:
        try:
            log_image_to(logger, path, key, step)
        except Exception as err:  # noqa: BLE001 (a tracking hiccup must not end hours of training)
            message = f"could not log {path.name} to {type(logger).__name__} ({type(err).__name__}: {err})"
            log.warning("%s", message)
            warnings.warn(message, UserWarning, stacklevel=2)


def log_image_to(logger: Logger, path: Path, key: str, step: int) -> None:
    if isinstance(logger, MLFlowLogger):
        client, run_id = logger.experiment, logger.run_id
        client.log_artifact(run_id, str(path), artifact_path=key)
        with Image.open(path) as image:
            client.log_image(run_id, image.convert("RGB"), key=key, step=step, synchronous=True)
    elif isinstance(logger, TensorBoardLogger):
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        logger.experiment.add_image(key, pixels, global_step=step, dataformats="HWC")
        logger.experiment.flush()
    elif isinstance(logger, WandbLogger):
        logger.log_image(key=key, images=[str(path)], step=step)
    elif isinstance(logger, CSVLogger):
        append_image_row(Path(logger.log_dir) / IMAGES_CSV, step, key, path)


def append_image_row(table: Path, step: int, key: str, path: Path) -> None:
    """One row ``step,key,path`` of a CSV run's image index (header written once)."""
    table.parent.mkdir(parents=True, exist_ok=True)
    new = not table.is_file()
    with table.open("a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(["step", "key", "path"])
        writer.writerow([step, key, str(path.resolve())])
