"""`python -m segldm.train_segmenter data=<option>`: train the mIoU segmenter on a dataset's real images.

The evaluation labels generated images with a segmentation network and compares the labels with the
masks they were generated from. Where no released network knows the dataset's classes (the built-in
scenes, folder datasets), this trains :class:`~segldm.metrics.segmenters.trained.SegNet` on the real
training images, then measures it on the real validation images exactly as ``segldm.eval`` will
(uint8 images -> labels -> one confusion matrix). That real-image mIoU is the ceiling for generated
images; it is stored in ``segmenter.ckpt`` and logged to MLflow.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

import segldm  # noqa: F401  (config resolvers)
from segldm.config.locations import hydra_config_path
from segldm.config.progress import tqdm  # plain lines when piped (not \r bars)
from segldm.config.startup import reports_startup_errors
from segldm.metrics.segmenters import real_pairs, segment_scores
from segldm.metrics.segmenters.trained import SegmenterModule, TrainedSegmenter, segmenter_checkpoint
from segldm.storage.checkpoint_files import save_checkpoint
from segldm.tracking.logger import (
    build_loggers,
    log_checkpoints,
    log_run_metadata,
    mlflow_loggers,
    task_overrides,
    tracked_run,
    tracking_callbacks,
)
from segldm.tracking.resilient import ResilientMLFlowLogger
from segldm.training.callbacks import ProgressLog, StepProgressBar

log = logging.getLogger(__name__)


def real_image_scores(segmenter_path: Path, datamodule: Any, device: str = "cpu") -> dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU of the saved segmenter on every real validation image."""
    segmenter = TrainedSegmenter(segmenter_path, device=device)
    dataset = datamodule.val_dataset
    pairs = [p for p in real_pairs(dataset, len(dataset), log=log) if p.image is not None]
    with tqdm(total=len(pairs), desc="segmenting real images", unit="img") as progress:
        scores = segment_scores(
            segmenter,
            [p.image for p in pairs],
            [p.labels for p in pairs],
            int(datamodule.n_labels),
            datamodule.ignore_label,
            datamodule.class_names,
            progress=progress,
        )
    return {
        "miou": scores.miou,
        "pixel_accuracy": scores.pixel_accuracy,
        "per_class": scores.table(),
        "images": len(pairs),
        "split": "validation",
    }


def train_segmenter(cfg: DictConfig) -> dict[str, Any]:
    """Fit the segmenter, save ``segmenter.ckpt`` with its real-image scores; returns them and the paths."""
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    datamodule = instantiate(cfg.data)
    net = instantiate(cfg.model)
    if net.n_classes != datamodule.n_labels:
        raise ValueError(
            f"model.n_classes={net.n_classes} but data.n_labels={datamodule.n_labels}; they must agree"
        )
    module = SegmenterModule(
        net,
        lr=float(cfg.optim.lr),
        weight_decay=float(cfg.optim.weight_decay),
        ignore_label=datamodule.ignore_label,
        class_names=datamodule.class_names,
    )
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    module.segldm_config = container

    loggers = build_loggers(cfg)
    checkpoints = ModelCheckpoint(
        dirpath=output_dir / "checkpoints",
        filename="step{step:07d}",
        auto_insert_metric_name=False,
        save_last=True,
        save_top_k=-1,
        every_n_train_steps=int(cfg.checkpoint_every_n_steps),
        enable_version_counter=False,
    )
    progress: list[L.Callback] = [ProgressLog(float(cfg.get("progress_every_n_seconds", 30)))]
    if cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar callback with the bar off
        progress.insert(0, StepProgressBar())
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=[checkpoints, *progress, *tracking_callbacks(loggers)], logger=loggers or False
    )
    log_run_metadata(loggers, cfg, task_overrides(), str(output_dir))
    trainer.fit(module, datamodule=datamodule)

    path = output_dir / "segmenter.ckpt"
    save_checkpoint(segmenter_checkpoint(module, container), path)
    scores = real_image_scores(path, datamodule)
    save_checkpoint(segmenter_checkpoint(module, container, scores), path)
    (output_dir / "report.json").write_text(json.dumps({"segmenter": str(path), "real": scores}, indent=1))
    log_checkpoints(loggers, str(path), None)
    for run in mlflow_loggers(loggers):
        metrics = {"real/miou": scores["miou"], "real/pixel_accuracy": scores["pixel_accuracy"]}
        for row in scores["per_class"]:
            if row["iou"] is not None:
                metrics[f"real/iou/{row['name']}"] = row["iou"]
        run.log_metrics(metrics, step=trainer.global_step)
        run.experiment.log_artifact(run.run_id, str(output_dir / "report.json"))
        if isinstance(run, ResilientMLFlowLogger):
            run.flush()  # after fit: nothing else waits for the queued batch
    if scores["miou"] < float(cfg.min_real_miou):
        log.warning(
            "real-image mIoU %.3f < min_real_miou=%.2f: generated-image mIoU measured with this segmenter "
            "means little; train longer (trainer.max_steps) or a wider net (model.channels)",
            scores["miou"],
            cfg.min_real_miou,
        )
    result = {"segmenter": str(path), "real": scores, "output_dir": str(output_dir)}
    run = tracked_run(loggers) if trainer.is_global_zero else None
    if run is not None:
        result.update(mlflow_run_id=run.run_id, tracking_uri=run.tracking_uri)
    print(
        f"segmenter:       {path}\nreal-image mIoU: {scores['miou']:.4f} (pixel accuracy "
        f"{scores['pixel_accuracy']:.4f}, {scores['images']} validation images)"
        + (f"\nMLflow run:      {run.run_id} ({run.tracking_uri})" if run is not None else ""),
        flush=True,
    )
    return result


@hydra.main(version_base="1.3", config_path=hydra_config_path(), config_name="train_segmenter")
@reports_startup_errors
def main(cfg: DictConfig) -> float:
    return float(train_segmenter(cfg)["real"]["miou"])


if __name__ == "__main__":
    main()
