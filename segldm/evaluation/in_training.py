"""In-training evaluation: FID, KID and mIoU of generated images at validations, as `val/*` metrics.

`segldm.eval` scores a finished checkpoint; this callback scores the model while it trains, with the
same pieces (the generation pipeline, the segmenter, torch-fidelity's FID/KID on Inception
features), on a fixed set of N validation masks, each sample with its own seed: the numbers move
only when the model does, so a sweep can rank on them (`sweep.objective=val/miou`). The real
images' Inception features are computed once per run (and cached on disk with
`fid.cache_dir`, shared with segldm.eval). Configured in `conf/callbacks/default.yaml`
(`generation_metrics`, off by default: `every_n_steps: 0`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from segldm.evaluation.common import select_pairs
from segldm.metrics.fid import (
    EXTRACTOR_NAME,
    InceptionFeatures,
    cached_features,
    fid_kid,
    file_sha256,
    resolve_inception_weights,
)
from segldm.metrics.segmenters import RealPair, Segmenter, segment_scores
from segldm.pipeline.generation import SamplingSettings, generate

log = logging.getLogger(__name__)


class GenerationMetrics(L.Callback):
    """At the first validation at or after every ``every_n_steps`` optimizer steps: generate one
    image per mask for the first ``num_samples`` validation samples and log ``{prefix}/miou``,
    ``{prefix}/pixel_accuracy``, ``{prefix}/fid``, ``{prefix}/kid`` (and the seconds it took).

    The segmenter and the Inception weights are loaded at set-up, so a missing file stops the run
    before the first step, not at the first evaluation.
    """

    def __init__(
        self,
        every_n_steps: int = 0,
        num_samples: int = 16,
        segmenter: Any = None,
        fid: Any = None,
        model_dir: str | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        eta: float | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
        batch_size: int = 8,
        use_ema: bool = True,
        prefix: str = "val",
    ) -> None:
        if every_n_steps < 0:
            raise ValueError(
                f"callbacks.generation_metrics.every_n_steps={every_n_steps} must be >= 0 (0: off)"
            )
        if every_n_steps and num_samples < 2:
            raise ValueError(
                f"callbacks.generation_metrics.num_samples={num_samples}: FID and KID need at least 2 images"
            )
        self.every_n_steps = int(every_n_steps)
        self.num_samples = int(num_samples)
        self.segmenter_config = segmenter
        self.fid_config = OmegaConf.create(fid or {"backend": "none"})
        self.model_dir = model_dir
        self.settings = SamplingSettings(
            sampler=sampler,
            steps=steps,
            eta=eta,
            use_ema=use_ema,
            batch_size=int(batch_size),
            guidance_scale=guidance_scale,
        )
        self.seed = int(seed)
        self.prefix = prefix
        self.next_due = self.every_n_steps  # saved in checkpoints: a resumed run measures at the same steps
        self.segmenter: Segmenter | None = None
        self.extractor: InceptionFeatures | None = None
        self._pairs: list[RealPair] | None = None
        self._real_features: torch.Tensor | None = None
        self.history: list[dict[str, float]] = []

    @property
    def enabled(self) -> bool:
        return self.every_n_steps > 0

    # ------------------------------------------------------------------ set-up: fail before training
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.enabled or stage != "fit" or self.segmenter is not None:
            return
        if not hasattr(pl_module, "generate"):
            raise ValueError(
                "callbacks.generation_metrics is on (every_n_steps > 0) but the model does not generate "
                "images (a first-stage run?): set callbacks.generation_metrics.every_n_steps=0"
            )
        if self.segmenter_config is None:
            raise ValueError(
                "callbacks.generation_metrics needs a segmenter (callbacks.generation_metrics.segmenter: a "
                "conf/segmenter option's config, e.g. segldm.metrics.segmenters.trained.TrainedSegmenter "
                "with ckpt=<python -m segldm.train_segmenter output>)"
            )
        self.segmenter = instantiate(self.segmenter_config, device=str(pl_module.device))
        datamodule = trainer.datamodule
        n_labels = int(getattr(datamodule, "n_labels", self.segmenter.n_classes))
        if self.segmenter.n_classes != n_labels:
            raise ValueError(
                f"callbacks.generation_metrics: the segmenter ({self.segmenter.name}) predicts "
                f"{self.segmenter.n_classes} classes but data.n_labels={n_labels}; use a segmenter trained "
                "on this data (python -m segldm.train_segmenter data=...)"
            )
        fid = self.fid_config
        weights = resolve_inception_weights(
            str(fid.get("backend", "auto")),
            fid.get("weights_path"),
            self.model_dir or "models",
            download=bool(fid.get("download", False)),
        )
        if weights is not None:
            self.extractor = InceptionFeatures(
                weights, device=pl_module.device, batch_size=int(fid.get("batch_size", 32))
            )

    def state_dict(self) -> dict[str, Any]:
        return {"next_due": self.next_due, "history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.next_due = int(state_dict.get("next_due", self.next_due))
        self.history = list(state_dict.get("history", []))

    # ------------------------------------------------------------------ measuring
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if not self.enabled or trainer.sanity_checking or step < self.next_due:
            return
        self.next_due = (step // self.every_n_steps + 1) * self.every_n_steps
        metrics = self.measure(trainer, pl_module)
        self.history.append({"step": float(step), **metrics})
        pl_module.log_dict({f"{self.prefix}/{k}": v for k, v in metrics.items()}, sync_dist=False)
        log.info(
            "step %d: %s",
            step,
            ", ".join(f"{self.prefix}/{k} {v:.4g}" for k, v in metrics.items()),
        )

    def pairs(self, trainer: L.Trainer) -> list[RealPair]:
        if self._pairs is None:
            dataset = trainer.datamodule.val_dataset
            self._pairs = select_pairs(
                dataset, min(self.num_samples, len(dataset)), need_images=self.extractor is not None
            )
        return self._pairs

    def real_features(self, trainer: L.Trainer, pairs: list[RealPair]) -> torch.Tensor:
        if self._real_features is None:
            assert self.extractor is not None
            images = hashlib.sha256()
            for pair in pairs:  # the real images themselves: any dataset, any split, any resizing
                images.update(str(pair.image.shape).encode() + pair.image.tobytes())
            key = {
                "real_images_sha256": images.hexdigest(),
                "extractor": EXTRACTOR_NAME,
                "weights_sha256": file_sha256(self.extractor.weights.path),
            }
            self._real_features, _, _ = cached_features(
                self.fid_config.get("cache_dir"),
                key,
                lambda: self.extractor([p.image for p in pairs], desc="Inception features (real)"),
            )
        return self._real_features

    @torch.no_grad()
    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        started = time.monotonic()
        pairs = self.pairs(trainer)
        was_training = pl_module.training
        pl_module.eval()
        try:
            seeds = [self.seed + p.index for p in pairs]
            inputs = [pl_module.condition.sample_input(p.sample()) for p in pairs]
            result = generate(pl_module, inputs, seeds, self.settings, progress=None)
        finally:
            pl_module.train(was_training)
        generated = result.uint8()
        datamodule = trainer.datamodule
        assert self.segmenter is not None
        scores = segment_scores(
            self.segmenter,
            generated,
            [p.labels for p in pairs],
            getattr(datamodule, "ignore_label", None),
        )
        metrics = {"miou": scores.miou, "pixel_accuracy": scores.pixel_accuracy}
        if self.extractor is not None:
            fake = self.extractor(generated, desc="Inception features (generated)")
            fid = fid_kid(
                fake,
                self.real_features(trainer, pairs),
                int(self.fid_config.get("kid_subsets", 100)),
                int(self.fid_config.get("kid_subset_size", 1000)),
            )
            metrics |= {"fid": fid["fid"], "kid": fid["kid_mean"]}
        metrics["generation_metrics_s"] = time.monotonic() - started
        return {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}


__all__ = ["GenerationMetrics"]
