"""An LDM checkpoint's evaluation (`python -m segldm.eval ckpt=<LDM checkpoint>`): FID, KID and mIoU of generated images against their masks.

One image is generated per validation mask (image of sample i seeded with ``eval.seed + i``, so the
set does not depend on batch size or on ``eval.num_samples``) and written as PNG beside the real
image and the coloured mask. Then:

* FID / KID between generated and real images with torch-fidelity's Inception
  (:mod:`segldm.metrics.fid`; real features cached per dataset, resolution and weights);
* mIoU / pixel accuracy / per-class IoU of a segmenter's labels of the generated images against the
  masks they came from (one confusion matrix over the set), and of the real images (the ceiling).

Everything lands in ``metrics.json``, ``report.md`` (grid mask | generated | real and the per-class
table) and an MLflow run tagged with the checkpoint and the training run it came from.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm.auto import tqdm

import segldm  # noqa: F401  (config resolvers)
from segldm.compat.compvis import load_compvis
from segldm.condition import LabelCondition
from segldm.evaluation.common import (
    fid_against_real,
    instantiate_plain,
    log_eval_run,
    real_image_features,
    select_pairs,
)
from segldm.evaluation.first_stage import evaluate_first_stage
from segldm.metrics.bootstrap import bootstrap_intervals, interval_text, precision_recall, real_halves_fid
from segldm.metrics.fid import (
    EXTRACTOR_NAME,
    InceptionFeatures,
    kid_plan,
    resolve_inception_weights,
)
from segldm.metrics.miou import SegmentationScores
from segldm.metrics.reconstruction import reconstruct
from segldm.metrics.segmenters import RealPair, Segmenter, segment_scores
from segldm.pipeline.generation import SamplingSettings, generate, resolve_device, to_uint8
from segldm.pipeline.masks import Mask, check_mask, size_multiple
from segldm.pipeline.visualize import save_grid
from segldm.runtime.loading import ldm_from_checkpoint
from segldm.storage.checkpoint_files import checkpoint_kind, read_checkpoint
from segldm.training.ldm import LatentDiffusion

log = logging.getLogger(__name__)
METRIC_KEYS = (
    "fid",
    "kid_mean",
    "kid_std",
    "first_stage_rfid",
    "real_halves_fid",
    "precision",
    "recall",
    "miou",
    "pixel_accuracy",
    "miou_real",
    "pixel_accuracy_real",
)


def load_checkpoint_model(
    cfg: DictConfig, device: torch.device, checkpoint: Mapping[str, Any] | None = None
) -> tuple[LatentDiffusion, int | None]:
    """The LDM (native, or CompVis with ``compvis_config``) and the training step it was saved at."""
    if cfg.get("compvis_config"):
        model = load_compvis(
            cfg.compvis_config, cfg.ckpt, trust_checkpoint=bool(cfg.trust_checkpoint), device=device
        )
        return model, None
    if checkpoint is None:
        checkpoint = read_checkpoint(
            cfg.ckpt, what="LDM checkpoint", trust_checkpoint=bool(cfg.trust_checkpoint)
        )
    model = ldm_from_checkpoint(checkpoint, cfg.ckpt, device)
    step = checkpoint.get("global_step")
    return model, int(step) if isinstance(step, int) else None


def data_config(cfg: DictConfig, model: LatentDiffusion) -> DictConfig:
    """``data=<option>`` when given, else the data config stored in the checkpoint."""
    if cfg.get("data") is not None:
        return cfg.data
    stored = (model.segldm_config or {}).get("data")
    if not isinstance(stored, Mapping) or "_target_" not in stored:
        raise ValueError(
            f"ckpt={cfg.ckpt} holds no data config (a CompVis checkpoint?); say which data to evaluate on, "
            "e.g. data=sflckr data.root=<folder>"
        )
    return OmegaConf.create(dict(stored))


def sampling_settings(cfg: DictConfig) -> SamplingSettings:
    """``eval.*`` sampler keys as the pipeline's settings (None: the checkpoint's model.sampler)."""
    return SamplingSettings(
        sampler=cfg.eval.sampler,
        steps=None if cfg.eval.steps is None else int(cfg.eval.steps),
        eta=None if cfg.eval.eta is None else float(cfg.eval.eta),
        use_ema=bool(cfg.eval.use_ema),
        batch_size=int(cfg.eval.batch_size),
        guidance_scale=None if cfg.eval.get("guidance_scale") is None else float(cfg.eval.guidance_scale),
    )


def colour_mask(condition: LabelCondition, pair: RealPair) -> np.ndarray:
    """The condition's colouring of a pair's mask (ignore pixels black, instance edges white), uint8 (H, W, 3)."""
    instances = None if pair.instances is None else torch.from_numpy(pair.instances)[None]
    return to_uint8(condition.colorize(torch.from_numpy(pair.labels)[None], instances))[0]


def write_images(
    out_dir: Path, pairs: Sequence[RealPair], generated: Sequence[np.ndarray], masks: Sequence[np.ndarray]
) -> None:
    """``generated/``, ``real/`` and ``masks/`` PNGs, one file per validation sample, same names."""
    for sub in ("generated", "real", "masks"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    for pair, image, mask in zip(pairs, generated, masks, strict=True):
        Image.fromarray(image).save(out_dir / "generated" / f"{pair.name}.png")
        Image.fromarray(mask).save(out_dir / "masks" / f"{pair.name}.png")
        if pair.image is not None:
            Image.fromarray(pair.image).save(out_dir / "real" / f"{pair.name}.png")


def run_segmenter(
    segmenter: Segmenter,
    images: Sequence[np.ndarray],
    pairs: Sequence[RealPair],
    ignore_label: int | None,
    class_names: Sequence[str] | None,
    desc: str,
) -> SegmentationScores:
    with tqdm(total=len(images), desc=desc, unit="img") as progress:
        return segment_scores(
            segmenter, images, [p.labels for p in pairs], ignore_label, class_names, progress=progress
        )


def per_class_rows(
    generated: SegmentationScores,
    real: SegmentationScores,
    pairs: Sequence[RealPair],
    n_labels: int,
    ignore_label: int | None,
    class_names: Sequence[str] | None,
) -> list[dict[str, Any]]:
    """Per class: IoU on generated and on real images (None where the class is absent), mask pixel share."""
    counts = np.zeros(n_labels, dtype=np.int64)
    for pair in pairs:
        labels = pair.labels[pair.labels != ignore_label] if ignore_label is not None else pair.labels
        counts += np.bincount(labels.ravel(), minlength=n_labels)[:n_labels]
    total = max(int(counts.sum()), 1)
    names = list(class_names or [str(i) for i in range(n_labels)])
    rows = []
    for i in range(n_labels):
        rows.append(
            {
                "id": i,
                "name": names[i] if i < len(names) else str(i),
                "iou_generated": generated.per_class_iou[i] if generated.present[i] else None,
                "iou_real": real.per_class_iou[i] if real.present[i] else None,
                "mask_pixel_share": counts[i] / total,
            }
        )
    return rows


def fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def write_report(out_dir: Path, metrics: Mapping[str, Any], grid: Path | None) -> Path:
    """A short markdown report: headline numbers, the grid, the per-class table."""
    sampler = metrics["sampler"]
    boot = metrics.get("bootstrap") or {}
    ci = (
        f" [{100 * boot['level']:.0f} % bootstrap interval, {boot['draws']} draws]"
        if boot.get("draws")
        else ""
    )
    lines = [
        f"# Evaluation of `{metrics['checkpoint']}`",
        "",
        f"step {metrics.get('global_step')}, {metrics['num_samples']} validation masks, "
        f"{sampler['name']} {sampler['steps']} steps, eta {sampler['eta']}, EMA {sampler['use_ema']}, seed {sampler['seed']}",
        "",
        f"| metric | generated{ci} | real (upper bound) | reference points at this N |",
        "|---|---|---|---|",
        f"| mIoU | {interval_text(metrics['miou'], boot, 'miou', 4)} | {fmt(metrics['miou_real'])} | |",
        f"| pixel accuracy | {fmt(metrics['pixel_accuracy'])} | {fmt(metrics['pixel_accuracy_real'])} | |",
        f"| FID | {interval_text(metrics.get('fid'), boot, 'fid', 2)} | "
        f"{fmt(metrics.get('real_halves_fid'), 2)} (two real halves, N/2 each: the floor) | "
        f"{fmt(metrics.get('first_stage_rfid'), 2)} (first-stage rFID: its reconstructions of the same real "
        "images, the ceiling) |",
        f"| KID (x1000) | {fmt(None if metrics.get('kid_mean') is None else 1000 * metrics['kid_mean'], 2)}"
        f" ± {fmt(None if metrics.get('kid_std') is None else 1000 * metrics['kid_std'], 2)} | | |",
        f"| precision / recall (k = {metrics.get('prc_neighborhood', 3)}) | {fmt(metrics.get('precision'), 3)} / "
        f"{fmt(metrics.get('recall'), 3)} | | |",
        "",
        f"Segmenter: {metrics['segmenter']['name']}.  FID/KID: {metrics['fid_backend'].get('implementation', 'skipped')}"
        + (
            f", weights: {metrics['fid_backend']['weights']['source']}"
            if metrics["fid_backend"].get("weights")
            else ""
        ),
        "",
    ]
    if grid is not None:
        lines += [f"![rows: mask | generated | real]({grid.name})", ""]
    lines += ["| id | class | IoU generated | IoU real | mask pixels |", "|---|---|---|---|---|"]
    shown = [r for r in metrics["per_class"] if r["iou_generated"] is not None or r["iou_real"] is not None]
    if len(shown) < len(metrics["per_class"]):
        lines.insert(
            -2,
            f"Classes absent from masks and predictions are left out ({len(shown)} of {len(metrics['per_class'])} shown).\n",
        )
    for row in shown:
        lines.append(
            f"| {row['id']} | {row['name']} | {fmt(row['iou_generated'])} | {fmt(row['iou_real'])} | "
            f"{100 * row['mask_pixel_share']:.1f}% |"
        )
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def log_to_mlflow(
    cfg: DictConfig, out_dir: Path, metrics: dict[str, Any], files: Sequence[Path]
) -> dict[str, str] | None:
    """An MLflow run with the metrics (and per-class IoUs), params, report files, tagged with the checkpoint."""
    values = {
        k: metrics[k] for k in METRIC_KEYS if isinstance(metrics.get(k), float) and math.isfinite(metrics[k])
    }
    for row in metrics["per_class"]:
        for which in ("generated", "real"):
            if row[f"iou_{which}"] is not None:
                values[f"iou_{which}/{row['name']}"] = float(row[f"iou_{which}"])
    return log_eval_run(cfg, out_dir, values, metrics.get("global_step"), files, METRIC_KEYS)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Generate, segment, measure; returns the metrics dict also written to ``metrics.json``.

    A first-stage checkpoint is scored on its reconstructions instead (:mod:`segldm.evaluation.first_stage`).
    """
    started = time.time()
    device = resolve_device(str(cfg.device))
    out_dir = Path(cfg.paths.output_dir)
    checkpoint = None
    if not cfg.get("compvis_config"):
        checkpoint = read_checkpoint(cfg.ckpt, what="checkpoint", trust_checkpoint=bool(cfg.trust_checkpoint))
        if checkpoint_kind(checkpoint) == "segldm-autoencoder":
            return evaluate_first_stage(cfg, checkpoint)
    model, global_step = load_checkpoint_model(cfg, device, checkpoint)
    data_cfg = data_config(cfg, model)
    datamodule = instantiate_plain(data_cfg)
    n_labels, ignore_label = int(datamodule.n_labels), datamodule.ignore_label
    class_names = list(datamodule.class_names or []) or None
    backend = str(cfg.eval.fid.backend)
    pairs = select_pairs(datamodule.val_dataset, cfg.eval.num_samples, need_images=backend != "none")
    model.check_sampler_settings(
        cfg.eval.steps,
        cfg.eval.sampler,
        "eval.steps",
        cfg.eval.get("guidance_scale"),
        "eval.guidance_scale",
        bool(cfg.eval.get("force_guidance", False)),
    )
    multiple, why = size_multiple(model)
    condition = model.condition
    for pair in pairs:
        check_mask(
            Mask(pair.name, pair.labels, f"validation[{pair.index}]", pair.instances),
            condition,
            multiple,
            why,
        )
    if backend != "none":
        _, _, kid_note = kid_plan(
            int(cfg.eval.fid.kid_subsets), int(cfg.eval.fid.kid_subset_size), len(pairs), len(pairs)
        )
        if kid_note:
            print(f"eval.fid.kid_subset_size={cfg.eval.fid.kid_subset_size}: {kid_note}", flush=True)
    # everything that can fail for a missing file fails here, before minutes of sampling
    weights = resolve_inception_weights(
        backend, cfg.eval.fid.weights_path, cfg.paths.model_dir, download=bool(cfg.eval.fid.download)
    )
    segmenter: Segmenter = instantiate_plain(cfg.segmenter, device=str(device))
    if segmenter.n_classes != n_labels:
        raise ValueError(
            f"the segmenter ({segmenter.name}) predicts {segmenter.n_classes} classes but the data has "
            f"data.n_labels={n_labels}; use a segmenter trained on this data (segmenter=trained "
            "segmenter.ckpt=<python -m segldm.train_segmenter data=... output>)"
        )
    timings: dict[str, float] = {"load": time.time() - started}

    t0 = time.time()
    seeds = [int(cfg.eval.seed) + p.index for p in pairs]  # the image of validation sample i: seed + i
    result = generate(
        model, [condition.sample_input(p.sample()) for p in pairs], seeds, sampling_settings(cfg)
    )
    generated = result.uint8()
    timings["generate"] = time.time() - t0
    masks = [colour_mask(condition, p) for p in pairs]
    write_images(out_dir, pairs, generated, masks)

    t0 = time.time()
    scores = run_segmenter(segmenter, generated, pairs, ignore_label, class_names, "segmenting generated")
    real_images = [p.image for p in pairs if p.image is not None]
    if len(real_images) == len(pairs):
        real_scores = run_segmenter(
            segmenter, real_images, pairs, ignore_label, class_names, "segmenting real"
        )
    else:
        real_scores = SegmentationScores(
            float("nan"), float("nan"), [float("nan")] * n_labels, [False] * n_labels, 0
        )
    timings["segment"] = time.time() - t0

    fid_info: dict[str, Any] = {"backend": backend}
    fid_metrics: dict[str, Any] = {"fid": None, "kid_mean": None, "kid_std": None}
    if weights is not None:
        t0 = time.time()
        import torch_fidelity

        extractor = InceptionFeatures(weights, device=device, batch_size=int(cfg.eval.fid.batch_size))
        fake = extractor(generated, desc="Inception features (generated)")
        real, cache_file, hit = real_image_features(cfg, data_cfg, pairs, weights, extractor, real_images)
        fid_metrics = fid_against_real(cfg, fake, real)
        # the ceiling: the first stage's own reconstructions of the same real images, at the same N
        reconstructed = reconstruct(
            model.first_stage_model,
            real_images,
            int(cfg.eval.batch_size),
            device,
            desc="first-stage reconstructions",
        )
        rfid = fid_against_real(
            cfg, extractor(reconstructed, desc="Inception features (reconstructed)"), real
        )
        fid_metrics["first_stage_rfid"] = rfid["fid"]
        # the floor: two disjoint halves of the real images (N/2 vs N/2)
        fid_metrics["real_halves_fid"] = real_halves_fid(real) if len(real) >= 4 else None
        neighbours = int(cfg.eval.prc_neighborhood)
        if min(len(fake), len(real)) > neighbours:
            fid_metrics |= precision_recall(fake, real, neighbours)
        fid_info |= {
            "implementation": f"torch-fidelity {torch_fidelity.__version__} {EXTRACTOR_NAME} pool3 (2048-d)",
            "weights": weights.describe(),
            "real_features_cache": str(cache_file) if cache_file else None,
            "real_features_cache_hit": hit,
        }
        timings["fid"] = time.time() - t0

    intervals = bootstrap_intervals(
        fake if weights is not None else None,
        real if weights is not None else None,
        scores.per_image,
        draws=int(cfg.eval.bootstrap.draws),
        seed=int(cfg.eval.bootstrap.seed),
        level=float(cfg.eval.bootstrap.level),
    )

    grid_n = min(int(cfg.eval.grid_samples), len(pairs))
    grid = None
    if grid_n and len({p.labels.shape for p in pairs[:grid_n]}) == 1:
        rows = [masks[:grid_n], generated[:grid_n]] + (
            [real_images[:grid_n]] if len(real_images) == len(pairs) else []
        )
        grid = save_grid(
            [torch.from_numpy(np.stack(r)).permute(0, 3, 1, 2).float() / 127.5 - 1 for r in rows],
            out_dir / "grid.png",
        )

    defaults = model.sampler_defaults
    metrics: dict[str, Any] = {
        "checkpoint": str(cfg.ckpt),
        "global_step": global_step,
        "num_samples": len(pairs),
        "prc_neighborhood": int(cfg.eval.prc_neighborhood),
        "data": {
            "target": str(data_cfg.get("_target_")),
            "n_labels": n_labels,
            "ignore_label": ignore_label,
            "split": "validation",
            "size": data_cfg.get("size"),
        },
        "sampler": {
            "name": cfg.eval.sampler or defaults.get("name", "ddim"),
            "steps": int(cfg.eval.steps if cfg.eval.steps is not None else defaults["steps"]),
            "eta": float(cfg.eval.eta if cfg.eval.eta is not None else defaults["eta"]),
            "use_ema": bool(cfg.eval.use_ema and model.use_ema),
            "guidance_scale": float(
                cfg.eval.get("guidance_scale")
                if cfg.eval.get("guidance_scale") is not None
                else defaults.get("guidance_scale", 1.0)
            ),
            "seed": int(cfg.eval.seed),
            "batch_size": int(cfg.eval.batch_size),
            # counted, not assumed: logSNR spacing merges steps, guidance doubles calls
            "unet_evaluations_per_image": result.unet_evaluations / max(1, len(pairs)),
        },
        **fid_metrics,
        "bootstrap": intervals,
        "fid_backend": fid_info,
        "miou": scores.miou,
        "pixel_accuracy": scores.pixel_accuracy,
        "miou_real": real_scores.miou,
        "pixel_accuracy_real": real_scores.pixel_accuracy,
        "segmenter": {
            "name": segmenter.name,
            "n_classes": segmenter.n_classes,
            "real_miou_at_training": (getattr(segmenter, "real_scores", {}) or {}).get("miou"),
        },
        "per_class": per_class_rows(scores, real_scores, pairs, n_labels, ignore_label, class_names),
        "output_dir": str(out_dir),
    }
    timings["total"] = time.time() - started
    metrics["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(metrics, indent=1))
    report = write_report(out_dir, metrics, grid)
    files = [metrics_path, report] + ([grid] if grid else [])
    tracking = log_to_mlflow(cfg, out_dir, metrics, files)
    if tracking:
        metrics["mlflow"] = tracking
        metrics_path.write_text(json.dumps(metrics, indent=1))
    print_summary(metrics)
    return metrics


def print_summary(metrics: Mapping[str, Any]) -> None:
    s = metrics["sampler"]
    lines = [
        f"{metrics['num_samples']} samples ({s['name']} {s['steps']} steps, eta {s['eta']}) from {metrics['checkpoint']}",
        f"mIoU            {interval_text(metrics['miou'], metrics.get('bootstrap'), 'miou', 4)} (real images: "
        f"{fmt(metrics['miou_real'])})",
        f"pixel accuracy  {fmt(metrics['pixel_accuracy'])} (real images: {fmt(metrics['pixel_accuracy_real'])})",
        f"FID             {interval_text(metrics.get('fid'), metrics.get('bootstrap'), 'fid', 3)} (its first "
        f"stage's rFID at this N, the ceiling: {fmt(metrics.get('first_stage_rfid'), 3)}; real halves, the floor: "
        f"{fmt(metrics.get('real_halves_fid'), 3)})",
        f"precision/recall {fmt(metrics.get('precision'), 3)} / {fmt(metrics.get('recall'), 3)}",
        f"KID             {fmt(metrics.get('kid_mean'), 5)} ± {fmt(metrics.get('kid_std'), 5)}",
        f"outputs:        {metrics['output_dir']} (metrics.json, report.md)",
    ]
    if metrics.get("mlflow"):
        m = metrics["mlflow"]
        lines.append(f"MLflow run:     {m['run_id']} (experiment {m['experiment']}, {m['tracking_uri']})")
    print("\n".join(lines), flush=True)
