"""Pre-emption: a termination signal writes ``last.ckpt`` at the next step boundary, then the run exits.

Clusters announce a kill with a signal: SIGTERM (SLURM, Kubernetes, ``kill``), SIGUSR1 (SLURM's
``--signal=USR1@<seconds>`` before the time limit; Lightning's SLURM auto-requeue listens to it),
SIGUSR2 (submitit). The handler only records the signal. At the end of the current optimizer step
(after its validation, when one is due, so the resumed run does not skip it), where weights,
optimizer, scheduler, EMA, data position and random state agree, the checkpoint is written
(atomically, through the trainer's CheckpointIO); then handlers that were installed before
run (under SLURM Lightning's: hpc checkpoint + ``scontrol requeue``; under submitit: its requeue),
the MLflow run is marked KILLED, and the process exits with status 128 + signal number (143 for
SIGTERM). Running the same command with ``resume=auto`` continues from that checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from segldm.runtime.lightning_state import validation_follows

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")


class Preempted(SystemExit):
    """Raised after the pre-emption checkpoint is written; the exit status is 128 + the signal number."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.checkpoint = checkpoint


class TerminatedBeforeTraining(SystemExit):
    """A checkpoint signal arrived while the run was being set up: nothing to save, exit 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


@contextlib.contextmanager
def exit_on_signals(signals: Any) -> Iterator[None]:
    """While the run is set up (before Lightning's loop and :class:`PreemptionCheckpoint` take the
    signals over), a checkpoint signal raises :class:`TerminatedBeforeTraining`: the run unwinds,
    so its MLflow run is ended KILLED instead of being left RUNNING by the default handler's exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: FrameType | None) -> None:
        raise TerminatedBeforeTraining(signum)

    previous = {sig: signal.signal(sig, _raise) for sig in parse_signals(signals)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def checkpoint_signals(cfg: Any) -> list[Any]:
    """The signals a run checkpoints on (``reliability.checkpoint_signals``; unset: the defaults, empty: none)."""
    return list((cfg.get("reliability") or {}).get("checkpoint_signals", list(DEFAULT_SIGNALS)) or [])


def parse_signals(names: Any) -> list[signal.Signals]:
    """``["SIGTERM", "USR1", 10]`` -> signal enums; unknown names raise naming the key and the choices."""
    result = []
    for name in list(names or []):
        try:
            if isinstance(name, int):
                result.append(signal.Signals(name))
                continue
            text = str(name).upper()
            result.append(signal.Signals[text if text.startswith("SIG") else f"SIG{text}"])
        except (KeyError, ValueError):
            raise ValueError(
                f"reliability.checkpoint_signals: {name!r} is not a signal; use names such as SIGTERM, SIGUSR1, SIGUSR2"
            ) from None
    if any(s in (signal.SIGKILL, signal.SIGSTOP) for s in result):
        raise ValueError("reliability.checkpoint_signals: SIGKILL and SIGSTOP cannot be caught; remove them")
    return result


class PreemptionCheckpoint(L.Callback):
    """On any of ``signals``: checkpoint at the end of the current step, run earlier handlers, exit 128+signal."""

    def __init__(self, signals: Any = DEFAULT_SIGNALS, filename: str = "last.ckpt") -> None:
        self.signals = parse_signals(signals)
        self.filename = filename
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    # ------------------------------------------------------------------ handlers
    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:  # only record: the checkpoint is written where the state is consistent
            self.received = signum

    def install(self) -> None:
        """Install the handlers (main thread only; Python delivers signals there), remembering the old ones."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("pre-emption handlers not installed: training does not run in the main thread")
            return
        for sig in self.signals:
            previous = signal.getsignal(sig)
            if previous is self._handle:
                continue
            self._previous[int(sig)] = previous
            signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning registered its own handlers (trainer._run), so they become "previous" ones
        self.install()
        if (
            getattr(trainer, "received_sigterm", False)
            and self.received is None
            and signal.SIGTERM in self.signals
        ):
            self.received = int(signal.SIGTERM)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.uninstall()

    # ------------------------------------------------------------------ the step boundary
    def checkpoint_path(self, trainer: L.Trainer) -> Path:
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return Path(callback.dirpath) / self.filename
        return Path(trainer.default_root_dir) / "checkpoints" / self.filename

    def should_preempt(self, trainer: L.Trainer) -> bool:
        """Whether any rank received a signal: every rank must write the (collective) checkpoint at the same step."""
        if trainer.world_size > 1:
            return trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        return self.received is not None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.should_preempt(trainer) and not validation_follows(trainer):  # else after the validation
            self.preempt(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (
            trainer.state.fn == TrainerFn.FITTING
            and not trainer.sanity_checking
            and self.should_preempt(trainer)
        ):
            self.preempt(trainer)

    def preempt(self, trainer: L.Trainer) -> None:
        signum = int(self.received or signal.SIGTERM)  # ranks that saw no signal follow the one that did
        name = signal.Signals(signum).name
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        message = (
            f"received {name}: wrote {path} at global step {trainer.global_step}; exiting with status "
            f"{128 + signum}. Run the same command with resume=auto to continue from there."
        )
        log.warning(message)
        for logger in trainer.loggers:
            if hasattr(logger, "mark_preempted"):
                logger.mark_preempted(name, trainer.global_step, str(path))
        previous = self._previous.get(signum)
        self.uninstall()
        if callable(previous):  # Lightning's SLURM requeue, submitit's requeue, a user's handler
            previous(signum, None)
        raise Preempted(signum, path)


__all__ = [
    "DEFAULT_SIGNALS",
    "Preempted",
    "PreemptionCheckpoint",
    "TerminatedBeforeTraining",
    "checkpoint_signals",
    "exit_on_signals",
    "parse_signals",
]
