"""`python -m segldm.eval ckpt=<LDM checkpoint>`: FID, KID and mIoU of generated images against their masks.

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

import hydra
import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm.auto import tqdm

import segldm  # noqa: F401  (config resolvers)
from segldm.checkpoints import ldm_from_checkpoint, read_checkpoint
from segldm.data.transforms import one_hot
from segldm.metrics.fid import (
    EXTRACTOR_NAME,
    InceptionFeatures,
    InceptionWeights,
    cached_features,
    fid_kid,
    kid_plan,
    resolve_inception_weights,
)
from segldm.metrics.miou import SegmentationScores
from segldm.metrics.segmenters import RealPair, Segmenter, real_pairs, segment_scores
from segldm.models.ldm import LatentDiffusion
from segldm.sample import Mask, check_mask, resolve_device, size_multiple, to_uint8
from segldm.tracking import check_tracking_uri, git_commit
from segldm.visualize import colorize_labels, save_grid

log = logging.getLogger(__name__)
METRIC_KEYS = ("fid", "kid_mean", "kid_std", "miou", "pixel_accuracy", "miou_real", "pixel_accuracy_real")


def load_checkpoint_model(cfg: DictConfig, device: torch.device) -> tuple[LatentDiffusion, int | None]:
    """The LDM (native, or CompVis with ``compvis_config``) and the training step it was saved at."""
    if cfg.get("compvis_config"):
        from segldm.compat.compvis import load_compvis

        model = load_compvis(
            cfg.compvis_config, cfg.ckpt, trust_checkpoint=bool(cfg.trust_checkpoint), device=device
        )
        return model, None
    checkpoint = read_checkpoint(cfg.ckpt, what="LDM checkpoint", trust_checkpoint=bool(cfg.trust_checkpoint))
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


def select_pairs(dataset: Any, num_samples: int | None, need_images: bool) -> list[RealPair]:
    """The first ``num_samples`` validation samples (all when None), checked for masks and images."""
    total = len(dataset)
    if num_samples is not None and not 0 < int(num_samples) <= total:
        raise ValueError(
            f"eval.num_samples={num_samples}, but the validation split has {total} samples; use 1..{total} "
            "or eval.num_samples=null (all)"
        )
    count = total if num_samples is None else int(num_samples)
    pairs = list(real_pairs(dataset, count, log=log))
    if not pairs:
        raise ValueError(f"none of the first {count} validation samples could be read (all skipped)")
    if need_images and any(p.image is None for p in pairs):
        raise ValueError(
            f"{type(dataset).__name__} yields masks without real images ('image' key): FID/KID and the "
            "real-image mIoU need them; use a dataset with images or eval.fid.backend=none"
        )
    return pairs


@torch.no_grad()
def generate_images(
    model: LatentDiffusion,
    pairs: Sequence[RealPair],
    n_labels: int,
    ignore_label: int | None,
    cfg: DictConfig,
    unet_calls: list[int] | None = None,
) -> list[np.ndarray]:
    """One uint8 (H, W, 3) image per mask; sample i's generator is seeded with eval.seed + its index.

    `unet_calls`, when given, receives the batch size of every UNet forward (what sampling cost).
    """
    device = model.device
    hook = (
        model.model.diffusion_model.register_forward_hook(lambda m, i, o: unet_calls.append(int(o.shape[0])))
        if unet_calls is not None
        else None
    )
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, pair in enumerate(pairs):
        by_shape.setdefault(pair.labels.shape, []).append(i)
    images: list[np.ndarray] = [np.empty(0, np.uint8)] * len(pairs)
    batch_size = max(1, int(cfg.eval.batch_size))
    with tqdm(total=len(pairs), desc="generating", unit="img") as progress:
        for indices in by_shape.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                seg = torch.stack(
                    [torch.from_numpy(one_hot(pairs[i].labels, n_labels, ignore_label)) for i in chunk]
                ).permute(0, 3, 1, 2)
                out = model.generate(
                    seg.to(device),
                    steps=cfg.eval.steps,
                    eta=cfg.eval.eta,
                    seeds=[int(cfg.eval.seed) + pairs[i].index for i in chunk],
                    use_ema=bool(cfg.eval.use_ema),
                    sampler=cfg.eval.sampler,
                )
                for row, image in zip(chunk, to_uint8(out), strict=True):
                    images[row] = image
                progress.update(len(chunk))
    if hook is not None:
        hook.remove()
    return images


def colour_mask(labels: np.ndarray, n_labels: int, ignore_label: int | None) -> np.ndarray:
    """The dataset palette colouring of a label map (ignore-label pixels black), uint8 (H, W, 3)."""
    ids = torch.from_numpy(labels).long()
    ignored = ids == ignore_label if ignore_label is not None else torch.zeros_like(ids, dtype=torch.bool)
    rgb = colorize_labels(ids.masked_fill(ignored, 0)[None], n_labels)[0]
    rgb = rgb.masked_fill(ignored[None], -1.0)
    return to_uint8(rgb[None])[0]


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


def real_feature_key(
    data_cfg: DictConfig, pairs: Sequence[RealPair], weights: InceptionWeights
) -> dict[str, Any]:
    """What the cached real-image features depend on: dataset config, split, the sample indices, sizes, weights."""
    from segldm.metrics.fid import file_sha256

    data = OmegaConf.to_container(data_cfg, resolve=True)
    relevant = {
        k: v
        for k, v in data.items()
        if k not in ("batch_size", "num_workers", "pin_memory", "persistent_workers")
    }
    return {
        "data": relevant,
        "split": "validation",
        "indices": [p.index for p in pairs],
        "sizes": sorted({tuple(p.image.shape) for p in pairs if p.image is not None}),
        "extractor": EXTRACTOR_NAME,
        "weights_sha256": file_sha256(weights.path),
    }


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
    lines = [
        f"# Evaluation of `{metrics['checkpoint']}`",
        "",
        f"step {metrics.get('global_step')}, {metrics['num_samples']} validation masks, "
        f"{sampler['name']} {sampler['steps']} steps, eta {sampler['eta']}, EMA {sampler['use_ema']}, seed {sampler['seed']}",
        "",
        "| metric | generated | real (upper bound) |",
        "|---|---|---|",
        f"| mIoU | {fmt(metrics['miou'])} | {fmt(metrics['miou_real'])} |",
        f"| pixel accuracy | {fmt(metrics['pixel_accuracy'])} | {fmt(metrics['pixel_accuracy_real'])} |",
        f"| FID | {fmt(metrics.get('fid'), 2)} | |",
        f"| KID (x1000) | {fmt(None if metrics.get('kid_mean') is None else 1000 * metrics['kid_mean'], 2)}"
        f" ± {fmt(None if metrics.get('kid_std') is None else 1000 * metrics['kid_std'], 2)} | |",
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


def find_source_run(client: Any, ckpt: Path) -> Any | None:
    """The training run that wrote this checkpoint: its ``segldm.checkpoint_dir`` tag is the file's folder."""
    folder = str(ckpt.resolve().parent)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    runs = client.search_runs(
        experiments,
        filter_string=f"tags.`segldm.checkpoint_dir` = '{folder}'",
        order_by=["attributes.start_time DESC"],
    )
    finished = [r for r in runs if r.info.status == "FINISHED"]
    return (finished or runs or [None])[0]


def flat_params(cfg: DictConfig) -> dict[str, str]:
    """Eval settings as MLflow params (values as strings, MLflow's 6000-char limit)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = str(value)[:6000]

    for key in ("ckpt", "eval", "segmenter", "device"):
        walk(key, container.get(key))
    data = container.get("data")
    if isinstance(data, Mapping):
        walk("data._target_", data.get("_target_"))
    return out


def log_to_mlflow(
    cfg: DictConfig, out_dir: Path, metrics: dict[str, Any], files: Sequence[Path]
) -> dict[str, str] | None:
    """An MLflow run with the metrics, params, report files, and tags naming the checkpoint and its run."""
    logger_cfg = (cfg.get("logger") or {}).get("mlflow")
    if (
        not logger_cfg or "tracking_uri" not in logger_cfg
    ):  # logger=none (only eval.yaml's experiment_name left)
        return None
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = str(logger_cfg.tracking_uri)
    check_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    ckpt = Path(str(cfg.ckpt))
    source = find_source_run(client, ckpt)
    name = logger_cfg.get("experiment_name") or (
        client.get_experiment(source.info.experiment_id).name if source else "eval"
    )
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        artifact_location = logger_cfg.get("artifact_location") if not uri.startswith("http") else None
        experiment_id = client.create_experiment(
            name, artifact_location=f"{artifact_location}/{name}" if artifact_location else None
        )
    else:
        experiment_id = experiment.experiment_id
    tags = {
        "segldm.task": "eval",
        "segldm.source_checkpoint": str(ckpt.resolve()),
        "segldm.output_dir": str(out_dir),
        "mlflow.source.git.commit": git_commit(cfg.paths.root_dir),
    }
    if source is not None:
        tags["segldm.source_run_id"] = source.info.run_id
    if metrics.get("global_step") is not None:
        tags["segldm.source_step"] = str(metrics["global_step"])
    run = client.create_run(experiment_id, run_name=cfg.get("run_name") or f"eval-{ckpt.stem}", tags=tags)
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    step = int(metrics.get("global_step") or 0)
    values = {
        k: metrics[k] for k in METRIC_KEYS if isinstance(metrics.get(k), float) and math.isfinite(metrics[k])
    }
    for row in metrics["per_class"]:
        for which in ("generated", "real"):
            if row[f"iou_{which}"] is not None:
                values[f"iou_{which}/{row['name']}"] = float(row[f"iou_{which}"])
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, now, step) for k, v in values.items()],
        params=[Param(k, v) for k, v in flat_params(cfg).items()],
    )
    for path in files:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    if source is not None and cfg.eval.log_to_source_run:
        headline = {f"eval/{k}": v for k, v in values.items() if k in METRIC_KEYS}
        client.log_batch(source.info.run_id, metrics=[Metric(k, v, now, step) for k, v in headline.items()])
    return {
        "run_id": run_id,
        "experiment": name,
        "tracking_uri": uri,
        **({"source_run_id": source.info.run_id} if source else {}),
    }


def instantiate_plain(config: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that raises the target's own error (missing file, wrong kind) unwrapped."""
    try:
        return instantiate(config, **kwargs)
    except InstantiationException as err:
        if err.__cause__ is not None:
            raise err.__cause__ from None
        raise


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Generate, segment, measure; returns the metrics dict also written to ``metrics.json``."""
    started = time.time()
    device = resolve_device(str(cfg.device))
    out_dir = Path(cfg.paths.output_dir)
    model, global_step = load_checkpoint_model(cfg, device)
    data_cfg = data_config(cfg, model)
    datamodule = instantiate_plain(data_cfg)
    n_labels, ignore_label = int(datamodule.n_labels), datamodule.ignore_label
    class_names = list(datamodule.class_names or []) or None
    backend = str(cfg.eval.fid.backend)
    pairs = select_pairs(datamodule.val_dataset, cfg.eval.num_samples, need_images=backend != "none")
    model.check_sampler_settings(cfg.eval.steps, cfg.eval.sampler, "eval.steps")
    multiple, why = size_multiple(model)
    model_labels = int(model.cond_stage_model.in_channels)
    for pair in pairs:
        check_mask(
            Mask(pair.name, pair.labels, f"validation[{pair.index}]"),
            model_labels,
            ignore_label,
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
    unet_calls: list[int] = []
    generated = generate_images(model, pairs, model_labels, ignore_label, cfg, unet_calls)
    timings["generate"] = time.time() - t0
    masks = [colour_mask(p.labels, n_labels, ignore_label) for p in pairs]
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
        real, cache_file, hit = cached_features(
            cfg.eval.fid.cache_dir,
            real_feature_key(data_cfg, pairs, weights),
            lambda: extractor(real_images, desc="Inception features (real)"),
        )
        fid_metrics = fid_kid(fake, real, int(cfg.eval.fid.kid_subsets), int(cfg.eval.fid.kid_subset_size))
        fid_info |= {
            "implementation": f"torch-fidelity {torch_fidelity.__version__} {EXTRACTOR_NAME} pool3 (2048-d)",
            "weights": weights.describe(),
            "real_features_cache": str(cache_file) if cache_file else None,
            "real_features_cache_hit": hit,
        }
        timings["fid"] = time.time() - t0

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
            "seed": int(cfg.eval.seed),
            "batch_size": int(cfg.eval.batch_size),
            # counted, not assumed: logSNR spacing merges steps, guidance doubles calls
            "unet_evaluations_per_image": sum(unet_calls) / max(1, len(pairs)),
        },
        **fid_metrics,
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
        f"mIoU            {fmt(metrics['miou'])} (real images: {fmt(metrics['miou_real'])})",
        f"pixel accuracy  {fmt(metrics['pixel_accuracy'])} (real images: {fmt(metrics['pixel_accuracy_real'])})",
        f"FID             {fmt(metrics.get('fid'), 3)}",
        f"KID             {fmt(metrics.get('kid_mean'), 5)} ± {fmt(metrics.get('kid_std'), 5)}",
        f"outputs:        {metrics['output_dir']} (metrics.json, report.md)",
    ]
    if metrics.get("mlflow"):
        m = metrics["mlflow"]
        lines.append(f"MLflow run:     {m['run_id']} (experiment {m['experiment']}, {m['tracking_uri']})")
    print("\n".join(lines), flush=True)


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
