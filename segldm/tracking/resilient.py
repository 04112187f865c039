"""MLflow logging that never kills training: retried calls, dropped with a warning when they keep failing.

A tracking server restarts, a network blips, SQLite is locked by a concurrent writer: a failed
``log_batch`` inside Lightning's logging would otherwise raise out of ``trainer.fit`` hours into a
run. :class:`ResilientMLFlowLogger` (``conf/logger/mlflow.yaml``) wraps its MLflow client in
:class:`RetryingClient`: each logging call (metrics, params, tags, artifacts, run status) is retried
with exponential backoff and, after ``log_retries`` failed tries, dropped with a warning. While the
server stays down, later calls try once (no backoff) until one succeeds, so training does not stall.
Calls that set the run up (create/get run and experiment) are retried but still raise: those happen
at start-up, where failing fast is right.

It also continues a run (``run_id`` from the resumed checkpoint): the run is set RUNNING again,
params that already hold the same value are not sent again (MLflow refuses changing a param), and a
pre-empted run ends as KILLED instead of FAILED.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

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

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name.startswith("_") or not callable(attr):
            return attr
        return functools.partial(self._call, name, attr)

    def _call(self, name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
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


class ResilientMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger with a :class:`RetryingClient`, run continuation and KILLED status.

    ``log_retries`` tries per logging call, waiting ``retry_wait_s`` x 2^k (at most ``retry_max_wait_s``)
    between them. For HTTP tracking servers MLflow's own per-request retries are capped
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_TIMEOUT``, unless set in the
    environment) so a dead server costs seconds per call, not minutes.
    """

    def __init__(
        self,
        *args: Any,
        log_retries: int = 5,
        retry_wait_s: float = 1.0,
        retry_max_wait_s: float = 30.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if str(self._tracking_uri).startswith(("http://", "https://")):
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        self._mlflow_client = RetryingClient(self._mlflow_client, log_retries, retry_wait_s, retry_max_wait_s)
        self.continued = kwargs.get("run_id") is not None  # an existing run (resume)
        self.terminal_status: str | None = None
        self._reopened = False

    @property
    def client(self) -> RetryingClient:
        return self._mlflow_client

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        client = MLFlowLogger.experiment.fget(self)  # type: ignore[attr-defined]
        if self.continued and not self._reopened and isinstance(client, RetryingClient):
            self._reopened = True
            client.update_run(self._run_id, status="RUNNING")
        return client

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
        if self._initialized:
            self.experiment.set_tag(
                self.run_id, "segldm.preempted", f"{signal_name} at step {step}: {checkpoint}"
            )

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        try:
            super().finalize(self.terminal_status or status)
        except Exception as err:  # noqa: BLE001 (the run's status is not worth failing a finished training)
            warnings.warn(
                f"could not set the MLflow run's final status: {err}", TrackingWarning, stacklevel=2
            )


__all__ = ["DROPPABLE", "ResilientMLFlowLogger", "RetryingClient", "TrackingWarning"]
