"""MLflow logging that never kills or stalls training: asynchronous batches, retried, dropped with a warning.

A tracking server restarts, a network blips, SQLite is locked by a concurrent writer: a failed
``log_batch`` inside Lightning's logging would otherwise raise out of ``trainer.fit`` hours into a
run, and a slow one would hold up every step. :class:`ResilientMLFlowLogger`
(``conf/logger/mlflow.yaml``) logs metrics and params with MLflow's asynchronous logging
(``synchronous: false``: MLflow's queue sends the batches from its own thread) and wraps its client
in :class:`RetryingClient`, which keeps each queued batch's future. Before every checkpoint is
written and when the run ends, :meth:`RetryingClient.flush` waits for them (at most
``flush_timeout_s``), so the metrics up to a checkpoint are in the store when the file appears; a
batch that failed is sent again synchronously, retried with exponential backoff and, after
``log_retries`` failed tries, dropped with a warning. Other logging calls (tags, artifacts, run
status) take that synchronous path directly. While the server stays down, later calls try once (no
backoff) until one succeeds. Calls that set the run up (create/get run and experiment) are retried
but still raise: those happen at start-up, where failing fast is right.

It also continues a run (``run_id`` from the resumed checkpoint): the run is set RUNNING again,
params that already hold the same value are not sent again (MLflow refuses changing a param), and a
pre-empted run ends as KILLED instead of FAILED.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import lightning as L
from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)

# Logging calls: retried, then dropped. Everything else is retried, then raised.
DROPPABLE = frozenset(
    {
        "log_batch",
        "log_metric",
        "log_param",
        "set_tag",
        "delete_tag",
        "log_artifact",
        "log_artifacts",
        "log_text",
        "log_dict",
        "log_figure",
        "log_image",
        "log_table",
        "log_inputs",
        "set_terminated",
        "update_run",
    }
)
# MLflow error codes that a retry cannot fix (the request itself is wrong).
PERMANENT_ERRORS = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "RESOURCE_ALREADY_EXISTS",
        "RESOURCE_DOES_NOT_EXIST",
        "INVALID_STATE",
        "BAD_REQUEST",
    }
)


class TrackingWarning(UserWarning):
    """An MLflow call failed and was dropped; training goes on."""


def is_permanent(err: BaseException) -> bool:
    return getattr(err, "error_code", None) in PERMANENT_ERRORS


class RetryingClient:
    """Proxy of an ``MlflowClient`` whose public methods are retried with exponential backoff."""

    def __init__(
        self,
        client: Any,
        retries: int = 5,
        wait_s: float = 1.0,
        max_wait_s: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if retries < 1:
            raise ValueError(f"logger.mlflow.log_retries={retries} must be at least 1")
        self._client = client
        self._retries = retries
        self._wait_s = wait_s
        self._max_wait_s = max_wait_s
        self._sleep = sleep
        self.degraded = False  # a call was dropped and none succeeded since
        self.dropped: list[str] = []
        self.pending: list[QueuedCall] = []  # asynchronous batches not yet known to have arrived

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name.startswith("_") or not callable(attr):
            return attr
        return functools.partial(self._call, name, attr)

    def _call(self, name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("synchronous") is False:
            try:
                operations = fn(*args, **kwargs)  # queued: MLflow's thread sends it
            except Exception:  # noqa: BLE001 (the queue refused it: the synchronous path below decides)
                kwargs = {**kwargs, "synchronous": True}
            else:
                self.pending.append(QueuedCall(name, fn, args, kwargs, operations))
                return operations
        tries = 1 if self.degraded and name in DROPPABLE else self._retries
        error: Exception | None = None
        for attempt in range(1, tries + 1):
            try:
                result = fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 (HTTP, SQL, OS errors: whatever the store raises)
                error = err
                if is_permanent(err) or attempt == tries:
                    break
                wait = min(self._max_wait_s, self._wait_s * 2 ** (attempt - 1))
                log.info("MLflow %s failed (%s); try %d/%d in %.1f s", name, err, attempt + 1, tries, wait)
                self._sleep(wait)
                continue
            if self.degraded and name in DROPPABLE:
                log.warning("MLflow answers again (%s succeeded); logging resumed", name)
                self.degraded = False
            return result
        assert error is not None
        if name not in DROPPABLE:
            raise error
        self.degraded = not is_permanent(error)
        self.dropped.append(name)
        how = (
            ""
            if is_permanent(error)
            else "again (still unavailable) "
            if tries == 1
            else f"after {tries} tries "
        )
        warnings.warn(
            f"MLflow {name} failed {how}and was dropped "
            f"({type(error).__name__}: {str(error)[:300]}); training continues ({len(self.dropped)} call(s) "
            "dropped so far)",
            TrackingWarning,
            stacklevel=3,
        )
        return None

    def flush(self, timeout_s: float | None = None) -> int:
        """Wait for the queued batches (at most ``timeout_s`` in all); send the failed ones again
        synchronously (retried, then dropped). Returns how many are still queued after the wait."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        queued, self.pending = self.pending, []
        for index, call in enumerate(queued):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            outcome = wait_for(call.operations, left)
            if outcome is TIMED_OUT:
                self.pending = queued[index:] + self.pending
                warnings.warn(
                    f"MLflow still has {len(self.pending)} logging batch(es) queued after {timeout_s:.0f} s; "
                    "training continues and they are sent when the store answers",
                    TrackingWarning,
                    stacklevel=2,
                )
                return len(self.pending)
            if outcome is not None:
                log.info("MLflow %s failed in the background (%s); sending it again", call.name, outcome)
                self._call(call.name, call.fn, *call.args, **{**call.kwargs, "synchronous": True})
        return 0


@dataclass
class QueuedCall:
    """A logging call handed to MLflow's asynchronous queue, kept until it is known to have arrived."""

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    operations: Any  # mlflow's RunOperations (its futures)


TIMED_OUT = object()


def wait_for(operations: Any, timeout_s: float | None) -> Any:
    """``operations.wait()`` for at most ``timeout_s``: None when it arrived, the error when it failed,
    ``TIMED_OUT`` when it is still queued."""
    if operations is None:
        return None
    outcome: list[Any] = []
    waiter = threading.Thread(target=_wait_into, args=(operations, outcome), daemon=True)
    waiter.start()
    waiter.join(timeout_s)
    return outcome[0] if outcome else TIMED_OUT


def _wait_into(operations: Any, outcome: list[Any]) -> None:
    try:
        operations.wait()
    except Exception as err:  # noqa: BLE001 (whatever the store raised in the background)
        outcome.append(err)
    else:
        outcome.append(None)


class ResilientMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger with a :class:`RetryingClient`, run continuation and KILLED status.

    ``synchronous=False`` (the config's default) queues metrics and params in MLflow's asynchronous
    logging; :meth:`flush` waits for them (before each checkpoint, through :class:`FlushBeforeCheckpoint`,
    and at the end). ``log_retries`` tries per failed logging call, waiting ``retry_wait_s`` x 2^k (at
    most ``retry_max_wait_s``) between them.
    """

    def __init__(
        self,
        *args: Any,
        log_retries: int = 5,
        retry_wait_s: float = 1.0,
        retry_max_wait_s: float = 30.0,
        flush_timeout_s: float = 60.0,
        synchronous: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, synchronous=synchronous, **kwargs)
        self.flush_timeout_s = flush_timeout_s
        self._mlflow_client = RetryingClient(self._mlflow_client, log_retries, retry_wait_s, retry_max_wait_s)
        self.given_run_id: str | None = kwargs.get("run_id")  # an existing run to continue (resume)
        self.continued = self.given_run_id is not None
        self.run_opened = False  # set once the run exists in the store (created, or continued and reopened)
        self.terminal_status: str | None = None
        self._reopened = False

    @property
    def client(self) -> RetryingClient:
        return self._mlflow_client

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        client = MLFlowLogger.experiment.fget(self)  # type: ignore[attr-defined]
        self.run_opened = True
        if self.continued and not self._reopened and isinstance(client, RetryingClient):
            self._reopened = True  # before run_id, which reads this property again
            client.update_run(self.run_id, status="RUNNING")
        return client

    @property
    def opened_run_id(self) -> str | None:
        """The run's id once it exists (given to continue, or created on first use), else None.

        Lightning's ``run_id`` creates the run when it does not exist yet; code that only wants to
        know about a run (to end it, to record it in a checkpoint) asks this instead.
        """
        return self.run_id if self.run_opened else self.given_run_id

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        """On a continued run, send only params it does not hold yet; changed values become one tag."""
        if not self.continued:
            super().log_hyperparams(params)
            return
        flat = _flatten_dict(_convert_params(params))
        run = self.experiment.get_run(self.run_id)
        existing: Mapping[str, str] = run.data.params if run is not None else {}
        new = {k: v for k, v in flat.items() if k not in existing}
        changed = [
            f"{k}: {existing[k]} -> {str(v)[:250]}"
            for k, v in flat.items()
            if k in existing and existing[k] != str(v)[:250]
        ]
        if changed:
            log.warning(
                "resumed MLflow run %s: params changed since it started: %s", self.run_id, "; ".join(changed)
            )
            self.experiment.set_tag(
                self.run_id, "segldm.runtime.resume.changed_params", "; ".join(changed)[:5000]
            )
        if new:
            super().log_hyperparams(new)

    def mark_preempted(self, signal_name: str, step: int, checkpoint: str) -> None:
        """Called by PreemptionCheckpoint: tag the run and end it as KILLED (not FAILED)."""
        self.terminal_status = "KILLED"
        if self.run_opened:
            self.experiment.set_tag(
                self.run_id, "segldm.preempted", f"{signal_name} at step {step}: {checkpoint}"
            )

    def flush(self) -> int:
        """Wait (at most ``flush_timeout_s``) for the logging batches MLflow still has queued."""
        return self._mlflow_client.flush(self.flush_timeout_s)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        self.flush()
        try:
            super().finalize(self.terminal_status or status)
        except Exception as err:  # noqa: BLE001 (the run's status is not worth failing a finished training)
            warnings.warn(
                f"could not set the MLflow run's final status: {err}", TrackingWarning, stacklevel=2
            )


class FlushBeforeCheckpoint(L.Callback):
    """Every checkpoint is written after the metrics logged before it are in the store, so a run
    killed once the file exists loses no value that its resume would not log again."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, ResilientMLFlowLogger):
                logger.flush()


__all__ = [
    "DROPPABLE",
    "FlushBeforeCheckpoint",
    "QueuedCall",
    "ResilientMLFlowLogger",
    "RetryingClient",
    "TrackingWarning",
    "wait_for",
]
