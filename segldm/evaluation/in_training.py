"""In-training evaluation: FID, KID and mIoU of generated images at validations, as `val/*` metrics.

`segldm.eval` scores a finished checkpoint; this callback scores the model while it trains, with the
same pieces (the generation pipeline, the segmenter, torch-fidelity's FID/KID on Inception
features), on a fixed set of N validation masks, each sample with its own seed: the numbers move
only when the model does, so a sweep can rank on them (`sweep.objective=val/miou`). The real
images' Inception features are computed once per run (and cached on disk with
`fid.cache_dir`, shared with segldm.eval). Configured in `conf/callbacks/default.yaml`
(`generation_metrics`, off by default: `every_n_steps: 0`); what it measures is its `metrics`
entries, the same :class:`segldm.metrics.metric.Metric` objects eval uses.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch

from segldm.config.instantiation import instantiate_plain
from segldm.evaluation.common import select_pairs
from segldm.metrics.metric import EvalSet, Metric, MetricContext, flat_values
from segldm.metrics.segmenters import RealPair
from segldm.pipeline.generation import SamplingSettings, generate

log = logging.getLogger(__name__)


class GenerationMetrics(L.Callback):
    """At the first validation at or after every ``every_n_steps`` optimizer steps: generate one
    image per mask for the first ``num_samples`` validation samples, compute every metric of
    ``metrics`` (:class:`segldm.metrics.metric.Metric`, as ``segldm.eval``) and log each value as
    ``{prefix}/<key>`` (and the seconds it took).

    The metrics are built and set up (segmenter, Inception weights) at set-up, so a missing file
    stops the run before the first step, not at the first evaluation.
    """

    def __init__(
        self,
        every_n_steps: int = 0,
        num_samples: int = 16,
        metrics: Mapping[str, Any] | None = None,
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
        self.metrics_config = {k: v for k, v in (metrics or {}).items() if v is not None}
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
        self.metrics: dict[str, Metric] | None = None
        self._pairs: list[RealPair] | None = None
        self.history: list[dict[str, float]] = []

    @property
    def enabled(self) -> bool:
        return self.every_n_steps > 0

    # ------------------------------------------------------------------ set-up: fail before training
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.enabled or stage != "fit" or self.metrics is not None:
            return
        if not hasattr(pl_module, "generate"):
            raise ValueError(
                "callbacks.generation_metrics is on (every_n_steps > 0) but the model does not generate "
                "images (a first-stage run?): set callbacks.generation_metrics.every_n_steps=0"
            )
        if not self.metrics_config:
            raise ValueError(
                "callbacks.generation_metrics is on but callbacks.generation_metrics.metrics is empty: "
                "nothing to measure (conf/callbacks/default.yaml lists the defaults)"
            )
        datamodule = trainer.datamodule
        metrics: dict[str, Metric] = {}
        for name, config in self.metrics_config.items():
            metric = instantiate_plain(config)
            if not isinstance(metric, Metric):
                raise TypeError(
                    f"callbacks.generation_metrics.metrics.{name}: {type(metric).__name__} is not a "
                    "segldm.metrics.metric.Metric"
                )
            metrics[name] = metric
        context = MetricContext(
            device=pl_module.device,
            n_labels=int(getattr(datamodule, "n_labels", 0)),
            ignore_label=getattr(datamodule, "ignore_label", None),
            class_names=getattr(datamodule, "class_names", None),
            num_samples=self.num_samples,
            model_dir=str(self.model_dir or "models"),
        )
        for name, metric in metrics.items():
            try:
                metric.setup(context)
            except ValueError as err:
                raise ValueError(f"callbacks.generation_metrics.metrics.{name}: {err}") from err
        self.metrics = metrics

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

    def needs_real(self) -> bool:
        return any(m.needs_real and getattr(m, "enabled", True) for m in (self.metrics or {}).values())

    def pairs(self, trainer: L.Trainer) -> list[RealPair]:
        if self._pairs is None:
            dataset = trainer.datamodule.val_dataset
            self._pairs = select_pairs(
                dataset, min(self.num_samples, len(dataset)), need_images=self.needs_real()
            )
        return self._pairs

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
        real = [p.image for p in pairs] if all(p.image is not None for p in pairs) else None
        images = EvalSet([p.name for p in pairs], result.uint8(), [p.labels for p in pairs], real)
        assert self.metrics is not None
        values = flat_values({name: metric.compute(images) for name, metric in self.metrics.items()})
        values["generation_metrics_s"] = time.monotonic() - started
        return {k: float(v) for k, v in values.items() if np.isfinite(v)}


__all__ = ["GenerationMetrics"]
