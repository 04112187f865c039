"""An LDM checkpoint's evaluation (`python -m segldm.eval ckpt=<LDM checkpoint>`): every configured
metric of images generated from the validation masks, under a stated protocol.

One image is generated per validation mask (image of sample i seeded with ``eval.seed + i``, so the
set does not depend on batch size or on ``eval.num_samples``) and written (PNG, or JPEG when asked and
no protocol forbids it) beside the real image and the coloured mask. Then each metric of
``metrics.*`` (:class:`segldm.metrics.metric.Metric`: Inception FID/KID/precision-recall with its
floor and ceiling, a segmenter's mIoU against the masks, or any other) computes its numbers from
those images, with paired bootstrap intervals where it can be resampled.

Before any sampling: the checkpoint, data, masks, sampler settings, the protocol (``eval/protocol``:
:mod:`segldm.evaluation.protocol`) and every metric's weights and label fit are checked. Everything
lands in ``metrics.json`` (with the protocol card), ``report.md`` (headline table, card, the published
rows of the same protocol, grid, per-class table) and an MLflow run tagged with the checkpoint, the
training run it came from and the card key.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from PIL import Image

import segldm  # noqa: F401  (config resolvers)
from segldm.compat.compvis import load_compvis
from segldm.condition import LabelCondition
from segldm.config.instantiation import instantiate_plain
from segldm.evaluation.common import log_eval_run, select_pairs
from segldm.evaluation.first_stage import evaluate_first_stage
from segldm.evaluation.html_report import write_html_report
from segldm.evaluation.protocol import check_protocol, dataset_name, protocol_card
from segldm.evaluation.published import published_rows
from segldm.metrics.metric import EvalSet, Metric, MetricContext, MetricResult, flat_values, paired_bootstrap
from segldm.metrics.segmenters import RealPair
from segldm.pipeline.generation import SamplingSettings, generate, resolve_device, to_uint8
from segldm.pipeline.mask_perturbations import LabelSpace, MaskPerturbation
from segldm.pipeline.masks import Mask, check_mask, size_multiple
from segldm.pipeline.visualize import save_grid
from segldm.runtime.loading import ldm_from_checkpoint
from segldm.storage.checkpoint_files import checkpoint_kind, read_checkpoint
from segldm.training.ldm import LatentDiffusion

log = logging.getLogger(__name__)
JPEG_QUALITY = 95


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
    out_dir: Path,
    pairs: Sequence[RealPair],
    generated: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    image_format: str = "png",
) -> list[np.ndarray]:
    """``generated/`` (PNG or JPEG), ``real/`` and ``masks/`` (PNG), one file per validation sample, same
    names. Returns the generated images as written: metrics are computed on what is on disk (JPEG
    artefacts included), as the published evaluation code read its folders."""
    for sub in ("generated", "real", "masks"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    written = []
    for pair, image, mask in zip(pairs, generated, masks, strict=True):
        if image_format == "jpg":
            path = out_dir / "generated" / f"{pair.name}.jpg"
            Image.fromarray(image).save(path, quality=JPEG_QUALITY)
            written.append(np.asarray(Image.open(path).convert("RGB")))
        else:
            Image.fromarray(image).save(out_dir / "generated" / f"{pair.name}.png")
            written.append(image)
        Image.fromarray(mask).save(out_dir / "masks" / f"{pair.name}.png")
        if pair.image is not None:
            Image.fromarray(pair.image).save(out_dir / "real" / f"{pair.name}.png")
    return written


def fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def build_metrics(cfg: DictConfig) -> dict[str, Metric]:
    """``metrics.<name>`` of the eval config, each a :class:`Metric` (null entries are switched off)."""
    metrics: dict[str, Metric] = {}
    for name, metric_cfg in (cfg.get("metrics") or {}).items():
        if metric_cfg is None:
            continue
        metric = instantiate_plain(metric_cfg)
        if not isinstance(metric, Metric):
            raise TypeError(
                f"metrics.{name}: {type(metric).__name__} is not a segldm.metrics.metric.Metric (the one interface "
                "eval, in-training evaluation and sweeps read)"
            )
        metrics[name] = metric
    return metrics


def build_mask_perturbation(cfg: DictConfig) -> MaskPerturbation | None:
    """``eval.mask_perturbation`` (``eval/mask_perturbation=<preset>`` or inline ``_target_``), or None."""
    spec = cfg.eval.get("mask_perturbation")
    if spec is None:
        return None
    perturbation = instantiate_plain(spec)
    if not isinstance(perturbation, MaskPerturbation):
        raise TypeError(
            f"eval.mask_perturbation: {type(perturbation).__name__} is not a "
            "segldm.pipeline.mask_perturbations.MaskPerturbation (presets: conf/eval/mask_perturbation/)"
        )
    return perturbation


def segmenter_choice(cfg: DictConfig) -> str | None:
    """The conf/segmenter option this run composed (None outside a Hydra run)."""
    if HydraConfig.initialized():
        return HydraConfig.get().runtime.choices.get("segmenter")
    return cfg.get("segmenter_choice")


def write_report(out_dir: Path, metrics: Mapping[str, Any], rows: Sequence[tuple[str, str, str]], grid: Path | None) -> Path:
    """A short markdown report: the protocol card, headline numbers, published rows, grid, per-class table."""
    sampler = metrics["sampler"]
    boot = metrics.get("bootstrap") or {}
    card = metrics["protocol_card"]
    ci = f" [{100 * boot['level']:.0f} % bootstrap interval, {boot['draws']} draws]" if boot.get("draws") else ""
    lines = [
        f"# Evaluation of `{metrics['checkpoint']}`",
        "",
        f"step {metrics.get('global_step')}, {metrics['num_samples']} validation masks, "
        f"{sampler['name']} {sampler['steps']} steps, eta {sampler['eta']}, guidance {sampler['guidance_scale']}, "
        f"EMA {sampler['use_ema']}, seeds {card['seed_range']}",
        "",
        f"| metric | generated{ci} | reference points at this N |",
        "|---|---|---|",
        *[f"| {label} | {value} | {reference} |" for label, value, reference in rows],
        "",
        *card_lines(card),
        "",
        *published_lines(card, metrics),
    ]
    perturbed = metrics.get("mask_perturbation")
    if grid is not None:
        rows_text = "mask | perturbed mask | generated | real" if perturbed else "mask | generated | real"
        lines += [f"![rows: {rows_text}]({grid.name})", ""]
    per_class = metrics.get("per_class") or []
    shown = [r for r in per_class if r["iou_generated"] is not None or r["iou_real"] is not None]
    if per_class:
        if len(shown) < len(per_class):
            lines.append(
                f"Classes absent from masks and predictions are left out ({len(shown)} of {len(per_class)} shown).\n"
            )
        lines += ["| id | class | IoU generated | IoU real | mask pixels |", "|---|---|---|---|---|"]
        for row in shown:
            lines.append(
                f"| {row['id']} | {row['name']} | {fmt(row['iou_generated'])} | {fmt(row['iou_real'])} | "
                f"{100 * row['mask_pixel_share']:.1f}% |"
            )
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def card_lines(card: Mapping[str, Any]) -> list[str]:
    """The protocol card as report lines."""
    lines = ["## Protocol card", ""]
    if card["protocol"]:
        status = "comparable with its published rows" if card["comparable"] else "NOT comparable"
        lines.append(f"Protocol **{card['protocol']}** on {card['dataset']} ({status}).")
        for deviation in card["deviations"]:
            lines.append(f"- deviation: {deviation}")
    else:
        lines.append(f"No protocol (eval/protocol=none) on {card['dataset']}: compare only with the same card.")
    lines.append("")
    lines.append(
        f"N {card['num_samples']}, {card['resolution'][0]}x{card['resolution'][1]} (HxW), {card['image_format'].upper()}, "
        f"card key `{card['card_key']}`"
    )
    perturbation = card.get("mask_perturbation")
    if perturbation:
        lines.append(
            f"- conditioning masks perturbed: {perturbation['name']} {json.dumps(perturbation['params'])}, seed "
            f"{perturbation['seed']} (masks_perturbed/); every metric scores against the clean masks (masks/)"
        )
    for name, metric_card in card["metrics"].items():
        lines.append(f"- {name}: `{json.dumps(metric_card, sort_keys=True, default=str)}`")
    return lines


def published_lines(card: Mapping[str, Any], metrics: Mapping[str, Any]) -> list[str]:
    """This row beside the published rows of the same protocol and dataset (only when comparable)."""
    if not card["protocol"]:
        return []
    rows = published_rows(card["protocol"], card["dataset"])
    if not card["comparable"]:
        return [f"Published {card['protocol']} rows on {card['dataset']} are not shown: this number's card differs.", ""]
    lines = [f"## Beside the published {card['protocol']} rows ({card['dataset']})", "", "| method | FID | mIoU | source |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['method']} | {fmt(row.get('fid'), 1)} | {fmt(row.get('miou'), 1)} | {row.get('source', '')} |")
    miou = metrics.get("miou")
    lines.append(
        f"| **this checkpoint** | {fmt(metrics.get('fid'), 1)} | {fmt(None if miou is None else 100 * miou, 1)} | this run |"
    )
    return [*lines, ""]


def log_to_mlflow(
    cfg: DictConfig,
    out_dir: Path,
    metrics: dict[str, Any],
    values: Mapping[str, float],
    headline: Sequence[str],
    files: Sequence[Path],
) -> dict[str, str] | None:
    """An MLflow run with every metric value (and per-class IoUs), the eval params, the protocol card
    (params ``card.*``, tags ``segldm.protocol`` / ``segldm.card_key``) and the report files."""
    values = dict(values)
    for row in metrics.get("per_class") or []:
        for which in ("generated", "real"):
            if row[f"iou_{which}"] is not None:
                values[f"iou_{which}/{row['name']}"] = float(row[f"iou_{which}"])
    card = metrics["protocol_card"]
    tags = {"segldm.protocol": str(card["protocol"]), "segldm.card_key": card["card_key"]}
    params = flat_card(card)
    return log_eval_run(cfg, out_dir, values, metrics.get("global_step"), files, headline, tags, params)


def flat_card(card: Mapping[str, Any]) -> dict[str, str]:
    """The card as MLflow params ``card.<path>`` (strings, MLflow's 6000-character limit)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            out[prefix] = str(value)[:6000]

    walk("card", card)
    return out


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Generate, measure every configured metric; returns the metrics dict also written to ``metrics.json``.

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
    metrics_by_name = build_metrics(cfg)
    need_real = any(m.needs_real and getattr(m, "backend", "auto") != "none" for m in metrics_by_name.values())
    pairs = select_pairs(datamodule.val_dataset, cfg.eval.num_samples, need_images=need_real)
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
        check_mask(Mask(pair.name, pair.labels, f"validation[{pair.index}]", pair.instances), condition, multiple, why)
    # eval.mask_perturbation: generation is conditioned on perturbed masks, every metric scores the clean ones
    perturbation = build_mask_perturbation(cfg)
    conditioning = pairs
    if perturbation is not None:
        space = LabelSpace(n_labels, ignore_label)
        perturbation.check(space)
        conditioning = [dataclasses.replace(p, labels=perturbation(p.labels, p.index, space)) for p in pairs]
        for pair in conditioning:
            source = f"validation[{pair.index}] after eval.mask_perturbation ({perturbation.name})"
            check_mask(Mask(pair.name, pair.labels, source, pair.instances), condition, multiple, why)
    resolution = list(pairs[0].labels.shape)
    image_format = str(cfg.eval.get("image_format", "png"))
    inception = metrics_by_name.get("inception")
    plan = check_protocol(
        cfg.eval.get("protocol"),
        dataset_name(data_cfg),
        fid_implementation=getattr(inception, "implementation", None),
        image_format=image_format,
        segmenter_choice=segmenter_choice(cfg),
        num_samples=len(pairs),
        split_size=len(datamodule.val_dataset),
        resolution=resolution,
        strict=bool(cfg.eval.get("strict_protocol", True)),
    )
    # everything that can fail for a missing file or a misfit fails here, before minutes of sampling
    context = MetricContext(
        device=device,
        n_labels=n_labels,
        ignore_label=ignore_label,
        class_names=class_names,
        num_samples=len(pairs),
        need_real=need_real,
        model_dir=str(cfg.paths.model_dir),
    )
    for metric in metrics_by_name.values():
        metric.setup(context)
    timings: dict[str, float] = {"load": time.time() - started}

    t0 = time.time()
    seeds = [int(cfg.eval.seed) + p.index for p in pairs]  # the image of validation sample i: seed + i
    result = generate(model, [condition.sample_input(p.sample()) for p in conditioning], seeds, sampling_settings(cfg))
    generated = result.uint8()
    timings["generate"] = time.time() - t0
    masks = [colour_mask(condition, p) for p in pairs]
    generated = write_images(out_dir, pairs, generated, masks, image_format)
    perturbed_masks = None
    if perturbation is not None:  # what generation saw, beside the clean masks/ the metrics score against
        perturbed_masks = [colour_mask(condition, p) for p in conditioning]
        (out_dir / "masks_perturbed").mkdir(exist_ok=True)
        for pair, mask in zip(pairs, perturbed_masks, strict=True):
            Image.fromarray(mask).save(out_dir / "masks_perturbed" / f"{pair.name}.png")

    real_images = [p.image for p in pairs] if all(p.image is not None for p in pairs) else None
    images = EvalSet([p.name for p in pairs], generated, [p.labels for p in pairs], real_images, model=model)
    results: dict[str, MetricResult] = {}
    for name, metric in metrics_by_name.items():
        t0 = time.time()
        results[name] = metric.compute(images)
        timings[name] = time.time() - t0
    intervals = paired_bootstrap(
        results,
        len(pairs),
        draws=int(cfg.eval.bootstrap.draws),
        seed=int(cfg.eval.bootstrap.seed),
        level=float(cfg.eval.bootstrap.level),
    )

    grid_n = min(int(cfg.eval.grid_samples), len(pairs))
    grid = None
    if grid_n and len({p.labels.shape for p in pairs[:grid_n]}) == 1:
        rows = [masks[:grid_n]] + ([perturbed_masks[:grid_n]] if perturbed_masks else [])
        rows += [generated[:grid_n]] + ([real_images[:grid_n]] if real_images else [])
        grid = save_grid(
            [torch.from_numpy(np.stack(r)).permute(0, 3, 1, 2).float() / 127.5 - 1 for r in rows],
            out_dir / "grid.png",
        )

    used = model.sampler_settings.override(
        cfg.eval.sampler, cfg.eval.steps, cfg.eval.eta, cfg.eval.get("guidance_scale")
    )
    sampler = {
        "name": used.name,
        "steps": used.steps,
        "eta": used.eta,
        "use_ema": bool(cfg.eval.use_ema and model.use_ema),
        "guidance_scale": used.guidance_scale,
        "seed": int(cfg.eval.seed),
        "batch_size": int(cfg.eval.batch_size),
        # counted, not assumed: logSNR spacing merges steps, guidance doubles calls
        "unet_evaluations_per_image": result.unet_evaluations / max(1, len(pairs)),
    }
    cards = {name: metric.card() for name, metric in metrics_by_name.items()}
    perturbation_card = None if perturbation is None else perturbation.card()
    if perturbation_card is not None and plan.name:
        plan.deviations.append(
            f"conditioning masks perturbed ({perturbation_card['name']} {perturbation_card['params']}, seed "
            f"{perturbation_card['seed']}); metrics score against the clean masks"
        )
    card = protocol_card(
        plan,
        cards,
        num_samples=len(pairs),
        resolution=resolution,
        image_format=image_format,
        sampler=sampler,
        seeds=seeds,
        mask_perturbation=perturbation_card,
    )
    values = flat_values(results)
    metrics: dict[str, Any] = {
        "checkpoint": str(cfg.ckpt),
        "global_step": global_step,
        "num_samples": len(pairs),
        "data": {
            "target": str(data_cfg.get("_target_")),
            "dataset": plan.dataset,
            "n_labels": n_labels,
            "ignore_label": ignore_label,
            "split": "validation",
            "size": data_cfg.get("size"),
        },
        "sampler": sampler,
        "mask_perturbation": perturbation_card,
        **{key: value for r in results.values() for key, value in r.values.items()},
        **{key: value for r in results.values() for key, value in r.details.items()},
        "bootstrap": intervals,
        "protocol_card": card,
        "directions": {key: d for m in metrics_by_name.values() for key, d in m.directions.items()},
        "output_dir": str(out_dir),
    }
    if inception is not None:  # the FID implementation, where earlier readers look for it
        metrics["fid_backend"] = {"backend": getattr(inception, "backend", None), **cards["inception"]}
    if "segmentation" in metrics_by_name:
        segmenter_card = cards["segmentation"]["segmenter"]
        metrics["segmenter"] = {
            "name": metrics_by_name["segmentation"].segmenter.name,
            "n_classes": segmenter_card.get("n_classes"),
            "real_miou_at_training": segmenter_card.get("real_miou_at_training"),
        }
    timings["total"] = time.time() - started
    metrics["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(metrics, indent=1, default=str))
    rows = [row for name, metric in metrics_by_name.items() for row in metric.report_rows(results[name], intervals)]
    report = write_report(out_dir, metrics, rows, grid)
    files = [metrics_path, report, write_html_report(report)] + ([grid] if grid else [])
    headline = [key for m in metrics_by_name.values() for key in m.directions]
    tracking = log_to_mlflow(cfg, out_dir, metrics, values, headline, files)
    if tracking:
        metrics["mlflow"] = tracking
        metrics_path.write_text(json.dumps(metrics, indent=1, default=str))
    print_summary(metrics, rows)
    return metrics


def print_summary(metrics: Mapping[str, Any], rows: Sequence[tuple[str, str, str]]) -> None:
    s = metrics["sampler"]
    card = metrics["protocol_card"]
    lines = [
        f"{metrics['num_samples']} samples ({s['name']} {s['steps']} steps, eta {s['eta']}) from {metrics['checkpoint']}",
        *[f"{label:<16}{value}" + (f" ({reference})" if reference else "") for label, value, reference in rows],
        *(
            [f"perturbation:   {metrics['mask_perturbation']['name']} {metrics['mask_perturbation']['params']}"]
            if metrics.get("mask_perturbation")
            else []
        ),
        f"protocol:       {card['protocol'] or 'none'} on {card['dataset']}"
        + ("" if card["comparable"] or not card["protocol"] else f" (not comparable: {'; '.join(card['deviations'])})"),
        f"outputs:        {metrics['output_dir']} (metrics.json, report.md)",
    ]
    if metrics.get("mlflow"):
        m = metrics["mlflow"]
        lines.append(f"MLflow run:     {m['run_id']} (experiment {m['experiment']}, {m['tracking_uri']})")
    print("\n".join(lines), flush=True)
