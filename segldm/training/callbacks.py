"""Lightning callbacks of segldm: sample grids written to the run folder and to every logger, and a
progress line in the run's log (visible also when the output is piped to a file)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from einops import rearrange
from lightning.pytorch.callbacks import RichProgressBar

from segldm.data.transforms import collate_samples
from segldm.pipeline.generation import SamplingSettings, generate
from segldm.pipeline.visualize import save_grid
from segldm.training.image_logging import log_image_file

log = logging.getLogger(__name__)


class SampleGridLogger(L.Callback):
    """Every N steps and at the end of training, draw a fixed set of validation masks.

    LDM runs get rows mask | generated (EMA weights, DDIM) | real; first-stage runs get
    real | reconstruction. Each sample has its own seed, so grids are comparable across steps.
    """

    def __init__(
        self,
        every_n_steps: int = 5000,
        num_samples: int = 8,
        ddim_steps: int = 50,
        eta: float = 1.0,
        seed: int = 0,
        guidance_scale: float | None = None,
    ) -> None:
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.ddim_steps = ddim_steps
        self.eta = eta
        self.seed = seed
        self.guidance_scale = guidance_scale
        self.written: list[Path] = []
        self._last_step = -1

    def _batch(self, trainer: L.Trainer) -> dict[str, Any]:
        dataset = trainer.datamodule.val_dataset
        items = [dataset[i] for i in range(min(self.num_samples, len(dataset)))]
        batch = collate_samples(items)
        batch.pop("skipped_", None)  # samples a skipping dataset could not load are left out
        return batch

    @torch.no_grad()
    def write(self, trainer: L.Trainer, module: L.LightningModule) -> Path | None:
        step = trainer.global_step
        if step == self._last_step or trainer.sanity_checking or not trainer.is_global_zero:
            return None  # with DDP, rank 0 draws and writes the grid; the others would repeat it
        self._last_step = step
        batch = self._batch(trainer)
        if "image" not in batch:
            return None
        real = rearrange(batch["image"], "b h w c -> b c h w").to(module.device)
        was_training = module.training
        module.eval()
        try:
            if hasattr(module, "generate"):
                condition = module.condition  # what the batch's mask means to this model
                inputs = condition.model_input(batch)
                seeds = [self.seed + i for i in range(real.shape[0])]
                settings = SamplingSettings(
                    steps=self.ddim_steps,
                    eta=self.eta,
                    batch_size=len(inputs),
                    guidance_scale=self.guidance_scale,
                )
                fake = torch.stack(generate(module, list(inputs), seeds, settings, progress=None).images)
                fake = fake.to(module.device)
                mask = condition.colorize(condition.labels_of(batch), condition.instances_of(batch)).to(
                    module.device
                )
                rows, kind = [mask, fake, real], "samples"
            else:
                rows, kind = [real, module.reconstruct(real)], "reconstructions"
        finally:
            module.train(was_training)
        out_dir = Path(trainer.default_root_dir) / kind
        path = save_grid(rows, out_dir / f"step{step:07d}.png")
        self.written.append(path)
        log_image_file(trainer, path, kind, step)  # each logger's image API (training/image_logging.py)
        return path

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self.write(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.write(trainer, module)


class ProgressLog(L.Callback):
    """A log line every ``every_n_seconds``: step, share done, seconds per step, ETA, the progress-bar
    metrics. Hydra sends it to the terminal and to the run's ``<task>.log``, so `make train > log`
    shows progress too (the rich bar draws only on a terminal)."""

    def __init__(self, every_n_seconds: float = 30.0) -> None:
        self.every_n_seconds = every_n_seconds
        self._started = 0.0
        self._first_step = 0
        self._last = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = self._last = time.monotonic()
        self._first_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last >= self.every_n_seconds and trainer.is_global_zero:
            self._last = now
            log.info("%s", self.line(trainer, now))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            log.info("%s", self.line(trainer, time.monotonic()))

    def line(self, trainer: L.Trainer, now: float) -> str:
        step, total = trainer.global_step, trainer.max_steps
        done = step - self._first_step
        per_step = (now - self._started) / done if done > 0 else float("nan")
        parts = [f"step {step}" + (f"/{total} ({100 * step / total:.0f}%)" if total and total > 0 else "")]
        if done > 0:
            parts.append(f"{per_step:.2f} s/step")
            if total and total > 0:
                parts.append(f"ETA {format_seconds(per_step * max(total - step, 0))}")
        metrics = {k: v for k, v in trainer.progress_bar_metrics.items() if isinstance(v, float)}
        parts += [f"{k} {v:.4f}" for k, v in sorted(metrics.items())]
        return " | ".join(parts)


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar, counting optimizer steps when training is measured in steps.

    With ``trainer.max_steps`` and no epoch limit (``max_epochs: -1``, the configs' default) the
    stock bar says "Epoch 4/-2" and counts the batches of an epoch nobody set; this one says
    "Epoch 4 · step" and counts ``global_step`` of ``max_steps``. With an epoch limit it is the stock bar.
    """

    def counts_steps(self) -> bool:
        trainer = self.trainer
        return trainer.max_epochs in (None, -1) and trainer.max_steps is not None and trainer.max_steps > 0

    def _get_train_description(self, current_epoch: int) -> str:
        if not self.counts_steps():
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch} · step"
        return f"{description:{len(self.validation_description)}}"

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self.counts_steps() else super().total_train_batches

    def _initialize_train_progress_bar_id(self) -> None:  # a mid-epoch resume starts at its step
        super()._initialize_train_progress_bar_id()
        if self.progress is not None and self.counts_steps():
            self.progress.update(self.train_progress_bar_id, completed=self.trainer.global_step)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.counts_steps() or self.is_disabled or self._leave:
            super().on_train_epoch_start(trainer, pl_module)
            return
        if self.progress is not None:  # one bar over all epochs: a new epoch only renames it
            description = self._get_train_description(trainer.current_epoch)
            if self.train_progress_bar_id is None:
                self.train_progress_bar_id = self._add_task(trainer.max_steps, description)
            self.progress.update(
                self.train_progress_bar_id,
                total=trainer.max_steps,
                completed=trainer.global_step,
                description=description,
                visible=True,
            )
        self.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not self.counts_steps():
            super().on_train_batch_end(trainer, pl_module, *args)
            return
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()  # a mid-epoch resume
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
