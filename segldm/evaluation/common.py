"""What `segldm.eval` needs for any checkpoint kind: validation pairs, the real-feature cache key,
and the MLflow run of an evaluation (tagged with the checkpoint and the training run it came from)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from segldm.config.instantiation import instantiate_plain  # noqa: F401  (re-exported for the evaluators)
from segldm.metrics.fid import (
    EXTRACTOR_NAME,
    InceptionFeatures,
    InceptionWeights,
    cached_features,
    fid_kid,
    file_sha256,
)
from segldm.metrics.segmenters import RealPair, real_pairs
from segldm.tracking.logger import check_tracking_uri, git_commit

log = logging.getLogger(__name__)


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


def real_feature_key(
    data_cfg: DictConfig, pairs: Sequence[RealPair], weights: InceptionWeights
) -> dict[str, Any]:
    """What the cached real-image features depend on: dataset config, split, the sample indices, sizes, weights."""
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


def log_eval_run(
    cfg: DictConfig,
    out_dir: Path,
    values: Mapping[str, float],
    global_step: int | None,
    files: Sequence[Path],
    headline_keys: Iterable[str],
    extra_tags: Mapping[str, str] | None = None,
    extra_params: Mapping[str, str] | None = None,
) -> dict[str, str] | None:
    """An MLflow run with ``values``, the eval params (and ``extra_params``), ``extra_tags`` and
    ``files``; the ``headline_keys`` also go into the source training run as ``eval/<key>`` at the
    checkpoint's step. None with logger=none."""
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
    if global_step is not None:
        tags["segldm.source_step"] = str(global_step)
    tags |= dict(extra_tags or {})
    run = client.create_run(experiment_id, run_name=cfg.get("run_name") or f"eval-{ckpt.stem}", tags=tags)
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    step = int(global_step or 0)
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, step) for k, v in values.items()],
        params=[Param(k, v) for k, v in (flat_params(cfg) | dict(extra_params or {})).items()],
    )
    for path in files:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    headline = set(headline_keys)
    if source is not None and cfg.eval.log_to_source_run:
        metrics = [Metric(f"eval/{k}", float(v), now, step) for k, v in values.items() if k in headline]
        client.log_batch(source.info.run_id, metrics=metrics)
    return {
        "run_id": run_id,
        "experiment": name,
        "tracking_uri": uri,
        **({"source_run_id": source.info.run_id} if source else {}),
    }


def real_image_features(
    cfg: DictConfig,
    data_cfg: DictConfig,
    pairs: Sequence[RealPair],
    weights: InceptionWeights,
    extractor: InceptionFeatures,
    real_images: Sequence[Any],
) -> tuple[torch.Tensor, Path | None, bool]:
    """Inception features of the real validation images, from eval.fid.cache_dir when this set was
    measured before; returns (features, cache file, hit)."""
    return cached_features(
        cfg.eval.fid.cache_dir,
        real_feature_key(data_cfg, pairs, weights),
        lambda: extractor(real_images, desc="Inception features (real)"),
    )


def fid_against_real(cfg: DictConfig, fake: torch.Tensor, real: torch.Tensor) -> dict[str, Any]:
    """FID and KID with the eval config's KID subsets (segldm.metrics.fid.fid_kid)."""
    return fid_kid(fake, real, int(cfg.eval.fid.kid_subsets), int(cfg.eval.fid.kid_subset_size))
