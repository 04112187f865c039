"""Resuming a killed run exactly: which folder and checkpoint, and the state Lightning does not save.

``resume=auto`` (or ``ckpt_path=last``) continues "the same command" from its newest complete
checkpoint. The command's run folder must therefore be found again:

* an explicit ``hydra.run.dir=<dir>`` is that folder;
* else with ``run_name=<name>`` the folder is ``outputs/runs/<task_name>/<name>``;
* else the newest ``outputs/runs/<task_name>/*`` folder whose saved Hydra overrides
  (``.hydra/overrides.yaml``) equal this command's, ignoring ``resume`` and ``ckpt_path``;
  none: a new timestamped folder and a fresh start.

(``conf/hydra/default.yaml`` computes the run folder through :func:`segldm.config.run_folder.run_dir`.) In that folder the
newest readable training checkpoint (``checkpoints/*.ckpt``, Lightning's ``hpc_ckpt_*.ckpt``) is
resumed; a corrupt one is skipped with a warning. An explicit ``ckpt_path=<file>`` is read and checked
first (:func:`plan_resume`) and refused with the reason when it cannot be resumed.

Lightning restores weights, optimizer, LR scheduler, EMA buffers, step and loop counters, and the
data position (``segldm.data.resumable``). :class:`TrainingState` adds the random state (torch,
CUDA, numpy, Python: the timestep and noise draws), saved in every checkpoint and restored just
before the first resumed batch, and keeps validation from consuming the training random stream, so
a resumed run draws what the uninterrupted run would have drawn. It also records the MLflow run id,
so the resumed run logs into the same MLflow run, and the checkpointed step's metrics that Lightning
had not sent yet. :class:`StepCheckpoint` writes a step's checkpoint after that step's validation
when one is due, so a resumed run never skips a validation.
"""

from __future__ import annotations

import json
import logging
import random
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.trainer.states import TrainerFn
from omegaconf import DictConfig, OmegaConf

from segldm.config.run_folder import ResumeWarning, resumes_automatically
from segldm.data.resumable import rank_and_world_size
from segldm.runtime.checkpoint_io import is_resumable
from segldm.runtime.checks import import_target
from segldm.runtime.lightning_state import (
    log_missing_metrics,
    pending_step_metrics,
    validation_follows,
)
from segldm.runtime.preemption import PreemptionCheckpoint, checkpoint_signals
from segldm.storage.atomic import atomic_save, remove_stale_temp_files
from segldm.storage.checkpoint_files import CheckpointError, read_checkpoint
from segldm.tracking.logger import opened_run_id
from segldm.training.guards import FiniteGradients

log = logging.getLogger(__name__)

MLFLOW_RUN_FILE = "mlflow_run.json"


# ------------------------------------------------------------------------------------ what to resume
@dataclass
class ResumePlan:
    """What ``segldm.train`` resumes: a validated checkpoint (or None) and the MLflow run to continue."""

    ckpt_path: str | None = None
    mlflow_run_id: str | None = None
    global_step: int | None = None
    reason: str = "new run"


def checkpoint_dir(cfg: DictConfig) -> Path:
    """Where ModelCheckpoint writes (callbacks.model_checkpoint.dirpath, else <output_dir>/checkpoints)."""
    dirpath = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath", default=None)
    return Path(dirpath) if dirpath else Path(cfg.paths.output_dir) / "checkpoints"


def model_kind(cfg: DictConfig) -> str | None:
    """The segldm checkpoint kind this config trains ('ldm', 'autoencoder': its class's
    ``checkpoint_kind``), None if its class says none."""
    target = cfg.model.get("_target_")
    try:
        cls = import_target(str(target)) if target else None
    except Exception:  # Hydra's import errors; validate_config names the key
        return None
    return getattr(cls, "checkpoint_kind", None)


def check_resumable(checkpoint: Mapping[str, Any], path: str | Path, expected_kind: str | None) -> None:
    """Refuse weights-only files and checkpoints of another stage, naming the way out."""
    if not is_resumable(checkpoint):
        raise CheckpointError(
            f"ckpt_path={path} holds no training state (optimizer, loop counters; e.g. written by segldm.convert), "
            f"so a run cannot resume from it; start a new run from its weights with init_from={path} "
            "(and ckpt_path=null)"
        )
    section = checkpoint.get("segldm")
    kind = section.get("kind") if isinstance(section, Mapping) else None
    if expected_kind and kind and kind != expected_kind:
        raise CheckpointError(
            f"ckpt_path={path} is a segldm '{kind}' checkpoint but this run trains a '{expected_kind}' model "
            f"(model={'ldm_seg' if expected_kind == 'ldm' else 'autoencoder'}); pass a checkpoint of the same model"
        )


def candidate_checkpoints(cfg: DictConfig) -> list[Path]:
    """Checkpoints of this run folder, newest first (ModelCheckpoint's and Lightning's hpc_ckpt_*)."""
    found = set(checkpoint_dir(cfg).glob("*.ckpt")) | set(Path(cfg.paths.output_dir).glob("hpc_ckpt_*.ckpt"))
    return sorted((p for p in found if p.is_file()), key=lambda p: p.stat().st_mtime_ns, reverse=True)


def _run_id_in(checkpoint: Mapping[str, Any]) -> str | None:
    state = (checkpoint.get("callbacks") or {}).get(TrainingState.__qualname__) or {}
    run_id = state.get("mlflow_run_id") if isinstance(state, Mapping) else None
    return str(run_id) if run_id else None


def read_run_record(output_dir: str | Path) -> dict[str, Any]:
    """The run folder's MLflow record (written at start, so a run killed before its first checkpoint continues)."""
    path = Path(output_dir) / MLFLOW_RUN_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        warnings.warn(f"resume=auto: ignoring unreadable {path}: {err}", ResumeWarning, stacklevel=2)
        return {}
    return record if isinstance(record, dict) else {}


def write_run_record(output_dir: str | Path, run_id: str, tracking_uri: str) -> Path:
    """Record the MLflow run of this run folder (atomically, like checkpoints)."""
    record = {"run_id": run_id, "tracking_uri": tracking_uri}
    return atomic_save(
        record, Path(output_dir) / MLFLOW_RUN_FILE, lambda obj, f: f.write(json.dumps(obj).encode())
    )


def plan_resume(cfg: DictConfig) -> ResumePlan:
    """Resolve resume=auto / ckpt_path=last / ckpt_path=<file> to a checked checkpoint, before anything is built.

    An explicit file is read completely (segldm.runtime.loading.read_checkpoint): a missing, truncated or
    corrupt file, a weights-only file or another stage's checkpoint is refused with the reason, never
    half-loaded. With resume=auto the newest readable checkpoint of the run folder is taken.
    """
    resume, ckpt_path = cfg.get("resume"), cfg.get("ckpt_path")
    trust = bool(cfg.get("trust_checkpoint", False))
    kind = model_kind(cfg)
    if not resumes_automatically(resume, ckpt_path):
        if not ckpt_path:
            return ResumePlan()
        checkpoint = read_checkpoint(ckpt_path, what="ckpt_path checkpoint", trust_checkpoint=trust)
        check_resumable(checkpoint, ckpt_path, kind)
        return ResumePlan(
            str(ckpt_path), _run_id_in(checkpoint), int(checkpoint["global_step"]), f"ckpt_path={ckpt_path}"
        )

    output_dir = Path(cfg.paths.output_dir)
    remove_stale_temp_files(checkpoint_dir(cfg))
    record = read_run_record(output_dir)
    for path in candidate_checkpoints(cfg):
        try:
            checkpoint = read_checkpoint(path, what="checkpoint", trust_checkpoint=trust)
            check_resumable(checkpoint, path, kind)
        except (CheckpointError, OSError) as err:
            warnings.warn(f"resume=auto: skipping {path}: {err}", ResumeWarning, stacklevel=2)
            continue
        run_id = record.get("run_id") or _run_id_in(checkpoint)
        step = int(checkpoint["global_step"])
        return ResumePlan(str(path), run_id, step, f"resume=auto: {path} (global step {step})")
    return ResumePlan(
        None, record.get("run_id"), None, f"resume=auto: no checkpoint in {checkpoint_dir(cfg)} yet"
    )


# ------------------------------------------------------------------------------------ random state
def capture_rng() -> dict[str, Any]:
    """Every global random state training draws from, in a form torch.load(weights_only=True) reads."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng` (CUDA states only when the device count matches)."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(
                f"the checkpoint holds CUDA random states of {len(cuda)} device(s), this process sees "
                f"{torch.cuda.device_count()}: CUDA draws after the resume differ from the original run",
                ResumeWarning,
                stacklevel=2,
            )


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose step checkpoints include the step's validation (conf/callbacks/default.yaml).

    Lightning writes ``every_n_train_steps`` checkpoints in on_train_batch_end, before the step's
    validation; a run resumed from one skips that validation, so its val metrics would be missing
    from the run. When validation is due at the step, this writes the checkpoint at the end of
    validation instead (the state of the model, optimizer and data is the same; only the logged
    metrics have moved on).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deferred: tuple[Any, Any, int] | None = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._every_n_train_steps > 0 and validation_follows(trainer):
            self._deferred = (outputs, batch, batch_idx)
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._deferred is None:
            super().on_validation_end(trainer, pl_module)
            return
        deferred, self._deferred = self._deferred, None
        super().on_train_batch_end(trainer, pl_module, *deferred)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._deferred is not None:  # never seen: Lightning changed its mind about validating
            self._deferred = None
            warnings.warn(
                f"the step {trainer.global_step} checkpoint waited for a validation that did not run and was "
                "skipped (the next batch is already loaded, so its state would not be consistent)",
                ResumeWarning,
                stacklevel=2,
            )


class TrainingState(L.Callback):
    """Saves and restores the random state, unlogged step metrics and the MLflow run id with every checkpoint.

    The state is restored in ``on_train_start``, after the model, data and loggers are set up and
    before the first batch is fetched. Validation runs on a copy of the random state (saved at its
    start, put back at its end), so how often validation runs never changes the training draws, and
    a checkpoint written before a validation resumes exactly like one written after it. A checkpoint
    written in on_train_batch_end carries that step's metrics, which Lightning logs only after it;
    the resumed run logs them if the tracking store does not hold them.
    """

    def __init__(self) -> None:
        self._pending: list[dict[str, Any]] | None = None
        self._pending_metrics: dict[str, Any] | None = None
        self._before_validation: dict[str, Any] | None = None
        self._at_batch_end = False
        self._trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def mlflow_run_id(self) -> str | None:
        for logger in self._trainer.loggers if self._trainer is not None else []:
            run_id = opened_run_id(logger) if isinstance(logger, MLFlowLogger) else None
            if run_id:
                return str(run_id)
        return None

    def state_dict(self) -> dict[str, Any]:
        rank, world = rank_and_world_size()
        states = [capture_rng()]
        if world > 1:  # every rank draws its own stream (per-rank seeds): keep all of them
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, states[0])
            states = gathered
        metrics = pending_step_metrics(self._trainer) if self._at_batch_end and self._trainer else None
        return {
            "version": 1,
            "rng": states,
            "mlflow_run_id": self.mlflow_run_id(),
            "unlogged_metrics": metrics,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = list(state_dict.get("rng") or []) or None
        self._pending_metrics = state_dict.get("unlogged_metrics")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending_metrics and trainer.is_global_zero:
            log_missing_metrics(trainer, self._pending_metrics)
        self._pending_metrics = None
        if not self._pending:
            return
        rank, world = rank_and_world_size()
        if len(self._pending) != world:
            warnings.warn(
                f"the checkpoint holds random states of {len(self._pending)} process(es), this run has {world}: "
                "rank r takes state r mod that count, so draws after the resume differ from the original run",
                ResumeWarning,
                stacklevel=2,
            )
        restore_rng(self._pending[rank % len(self._pending)])
        self._pending = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._at_batch_end = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._at_batch_end = True  # checkpoints from here until validation precede the step's logging

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._at_batch_end = False
        if trainer.state.fn == TrainerFn.FITTING:
            self._before_validation = capture_rng()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._before_validation is not None:
            restore_rng(self._before_validation)
            self._before_validation = None


def reliability_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The callbacks ``segldm.train`` always adds (``reliability`` in conf/train.yaml), even with callbacks=none."""
    callbacks: list[L.Callback] = [TrainingState()]
    signals = checkpoint_signals(cfg)
    if signals:
        callbacks.append(PreemptionCheckpoint(signals))
    if (cfg.get("reliability") or {}).get("check_gradients", True):
        callbacks.append(FiniteGradients())
    return callbacks


__all__ = [
    "MLFLOW_RUN_FILE",
    "ResumePlan",
    "StepCheckpoint",
    "TrainingState",
    "capture_rng",
    "check_resumable",
    "plan_resume",
    "read_run_record",
    "reliability_callbacks",
    "restore_rng",
    "write_run_record",
]
