"""`python -m segldm.eval ckpt=<first-stage checkpoint>`: how well the autoencoder reconstructs.

The LDM can never draw sharper than its first stage decodes, so this is its ceiling: every
validation image is encoded, quantised and decoded as the LDM decodes, then scored against itself:
reconstruction FID (rFID, same Inception and real-feature cache as the LDM's FID), L1, PSNR, and
LPIPS when VGG16 weights are available (`eval.lpips_vgg16_path` or torchvision's cache). Results go
to ``metrics.json``, ``report.md`` (grid real | reconstruction), PNGs and an MLflow run beside the
training run (``eval/rfid`` etc. in the training run at the checkpoint's step).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from segldm.evaluation.common import (
    fid_against_real,
    instantiate_plain,
    log_eval_run,
    real_image_features,
    select_pairs,
)
from segldm.evaluation.html_report import write_html_report
from segldm.metrics.fid import InceptionFeatures, resolve_inception_weights
from segldm.metrics.reconstruction import l1_error, mean_lpips, psnr, reconstruct
from segldm.models.autoencoder import VQModel
from segldm.models.perceptual import LPIPS, find_vgg16_weights
from segldm.pipeline.generation import resolve_device
from segldm.pipeline.visualize import save_grid
from segldm.storage.checkpoint_files import CheckpointError

FIRST_STAGE_METRICS = ("rfid", "l1", "psnr", "lpips")


def first_stage_from_checkpoint(
    checkpoint: Mapping[str, Any], path: str | Path, device: torch.device
) -> tuple[VQModel, dict[str, Any]]:
    """The VQModel of a segldm autoencoder checkpoint (built from its stored config) and that config."""
    config = (checkpoint.get("segldm") or {}).get("config")
    first_stage = (config or {}).get("model", {}).get("first_stage") if isinstance(config, Mapping) else None
    if not isinstance(first_stage, Mapping):
        raise CheckpointError(
            f"{path}: a first-stage checkpoint without its segldm config (model.first_stage); it cannot be "
            "rebuilt from the file alone"
        )
    settings = OmegaConf.create({**dict(first_stage), "ckpt_path": str(path)})
    vq = instantiate_plain(settings)
    return vq.to(device).eval(), dict(config)


def evaluate_first_stage(cfg: DictConfig, checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """Reconstruct, measure, report; returns the metrics dict also written to ``metrics.json``."""
    started = time.time()
    device = resolve_device(str(cfg.device))
    out_dir = Path(cfg.paths.output_dir)
    vq, config = first_stage_from_checkpoint(checkpoint, cfg.ckpt, device)
    data_cfg = cfg.data if cfg.get("data") is not None else OmegaConf.create(dict(config["data"]))
    datamodule = instantiate_plain(data_cfg)
    pairs = select_pairs(datamodule.val_dataset, cfg.eval.num_samples, need_images=True)
    backend = str(cfg.eval.fid.backend)
    weights = resolve_inception_weights(
        backend, cfg.eval.fid.weights_path, cfg.paths.model_dir, download=bool(cfg.eval.fid.download)
    )
    lpips_file = find_vgg16_weights(cfg.eval.get("lpips_vgg16_path"), key="eval.lpips_vgg16_path")
    lpips = LPIPS(lpips_file).to(device) if lpips_file is not None else None

    real = [p.image for p in pairs]
    reconstructed = reconstruct(vq, real, int(cfg.eval.batch_size), device)
    for sub, images in (("reconstructed", reconstructed), ("real", real)):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
        for pair, image in zip(pairs, images, strict=True):
            Image.fromarray(image).save(out_dir / sub / f"{pair.name}.png")
    metrics: dict[str, Any] = {
        "checkpoint": str(cfg.ckpt),
        "kind": "first_stage",
        "global_step": checkpoint.get("global_step"),
        "num_samples": len(pairs),
        "l1": l1_error(real, reconstructed),
        "psnr": psnr(real, reconstructed),
        "lpips": mean_lpips(lpips, real, reconstructed, int(cfg.eval.batch_size), device) if lpips else None,
        "lpips_weights": lpips.backbone_source if lpips else None,
        "rfid": None,
    }
    if weights is not None:
        extractor = InceptionFeatures(weights, device=device, batch_size=int(cfg.eval.fid.batch_size))
        fake = extractor(reconstructed, desc="Inception features (reconstructed)")
        real_features, _, _ = real_image_features(cfg, data_cfg, pairs, weights, extractor, real)
        scores = fid_against_real(cfg, fake, real_features)
        metrics |= {"rfid": scores["fid"], "fid_backend": {"backend": backend, "weights": weights.describe()}}
    grid_n = min(int(cfg.eval.grid_samples), len(pairs))
    grid = None
    if grid_n and len({image.shape for image in real[:grid_n]}) == 1:
        rows = [np.stack(real[:grid_n]), np.stack(reconstructed[:grid_n])]
        grid = save_grid(
            [torch.from_numpy(r).permute(0, 3, 1, 2).float() / 127.5 - 1 for r in rows], out_dir / "grid.png"
        )
    metrics["timings_s"] = {"total": round(time.time() - started, 1)}
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(metrics, indent=1, default=str))
    report = write_first_stage_report(out_dir, metrics, grid)
    values = {
        k: metrics[k]
        for k in FIRST_STAGE_METRICS
        if isinstance(metrics.get(k), float) and math.isfinite(metrics[k])
    }
    step = metrics["global_step"] if isinstance(metrics["global_step"], int) else None
    tracking = log_eval_run(
        cfg,
        out_dir,
        values,
        step,
        [metrics_path, report, write_html_report(report), *([grid] if grid else [])],
        FIRST_STAGE_METRICS,
    )
    if tracking:
        metrics["mlflow"] = tracking
        metrics_path.write_text(json.dumps(metrics, indent=1, default=str))
    print(
        f"first stage {cfg.ckpt}, {len(pairs)} validation images: rFID {fmt(metrics['rfid'], 2)}, "
        f"L1 {fmt(metrics['l1'], 4)}, PSNR {fmt(metrics['psnr'], 2)} dB, LPIPS {fmt(metrics['lpips'], 4)}\n"
        f"outputs:        {out_dir} (metrics.json, report.md)",
        flush=True,
    )
    return metrics


def fmt(value: Any, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def write_first_stage_report(out_dir: Path, metrics: Mapping[str, Any], grid: Path | None) -> Path:
    lines = [
        f"# First-stage reconstruction: `{metrics['checkpoint']}`",
        "",
        f"{metrics['num_samples']} validation images, each encoded, quantised and decoded (as the LDM decodes).",
        "",
        "| rFID | L1 ([-1, 1]) | PSNR (dB) | LPIPS |",
        "|---|---|---|---|",
        f"| {fmt(metrics['rfid'], 2)} | {fmt(metrics['l1'], 4)} | {fmt(metrics['psnr'], 2)} | {fmt(metrics['lpips'], 4)} |",
        "",
        "LPIPS: " + (metrics["lpips_weights"] or "not measured (no VGG16 weights: eval.lpips_vgg16_path)"),
    ]
    if grid is not None:
        lines += ["", "Rows: real | reconstruction", "", f"![real | reconstruction]({grid.name})"]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
