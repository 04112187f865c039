"""Tracking: logger construction (`logger=mlflow|csv|tensorboard|wandb|none`, docs/loggers.md) with
fail-fast checks, and what every run records.

Every logger gets the resolved config (params), losses and lr per step (Lightning) and sample grids
with their step (training/image_logging.py). MLflow runs also get the config YAML (artifact), the
Hydra override string and git commit (tags), the output and checkpoint locations (tags); an MLflow
store is checked before training (unreachable server: fail, or local fallback); a logger whose
optional package is missing fails at start-up naming the `pip install segldm[...]` extra.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import subprocess
import tempfile
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, MLFlowLogger
from omegaconf import DictConfig, OmegaConf

from segldm.errors import StartupError
from segldm.tracking.resilient import FlushBeforeCheckpoint, ResilientMLFlowLogger

log = logging.getLogger(__name__)
ON_UNAVAILABLE = ("fail", "local")


class TrackingUnavailableError(StartupError, RuntimeError):
    """The configured MLflow tracking server cannot be reached."""


class LoggerPackageError(StartupError):
    """A configured logger's optional package is not installed."""


# Lightning logger class -> (the `segldm[...]` extra, the modules any one of which it can use)
LOGGER_EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "WandbLogger": ("wandb", ("wandb",)),
    "TensorBoardLogger": ("tensorboard", ("tensorboard", "tensorboardX")),
}


def check_logger_package(name: str, target: str) -> None:
    """Refuse a logger whose package is missing, naming the extra that installs it."""
    extra, modules = LOGGER_EXTRAS.get(str(target).rsplit(".", 1)[-1], (None, ()))
    if extra is None or any(importlib.util.find_spec(m) is not None for m in modules):
        return
    raise LoggerPackageError(
        f"logger.{name} ({target}) needs the {modules[0]} package, which is not installed: "
        f"pip install 'segldm[{extra}]' (or pip install {modules[0]}), or choose another logger "
        "(logger=mlflow, logger=csv or logger=none; docs/loggers.md)"
    )


def sweep_logger_note(cfg: DictConfig) -> str | None:
    """What a multirun loses without MLflow (None when an MLflow logger is configured)."""
    targets = [
        str(c.get("_target_", "")) for c in (cfg.get("logger") or {}).values() if isinstance(c, DictConfig)
    ]
    if any("MLFlowLogger" in t for t in targets):
        return None
    chosen = ",".join(sorted(cfg.get("logger") or {})) or "none"
    return (
        f"sweep with logger={chosen}: finished jobs are still skipped and ranked from their marker files, "
        "but the sweep's MLflow tags and the report's learning curves need MLflow; add it with "
        f"logger=[mlflow,{chosen}] (docs/loggers.md)"
    )


def create_sqlite_store(uri: str) -> None:
    """Create (and migrate) a local SQLite store once, under a file lock beside it.

    MLflow builds a new store's tables on first use; two processes doing that at once both run the
    schema migration and one dies (``duplicate column name``). The first to take ``<db>.lock``
    creates the store, the others wait and find it made.
    """
    from mlflow.tracking import MlflowClient

    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        except Exception as err:  # noqa: BLE001 (an SQLite or migration error: say what and the way out)
            raise TrackingUnavailableError(
                f"could not create or open the MLflow store {db} ({type(err).__name__}: {err}). If another "
                "process was creating it at the same moment, run the command again; if the file is damaged, "
                "move it aside (a new store is created) or set logger.mlflow.tracking_uri=<other store>"
            ) from err
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Create the SQLite store (once, safely with concurrent first users), or make sure an HTTP server answers."""
    if uri.startswith("sqlite:///"):
        create_sqlite_store(uri)
        return
    if uri.startswith(("http://", "https://")):
        health = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=timeout_s) as response:  # noqa: S310 (user's URI)
                if response.status != 200:
                    raise TrackingUnavailableError(f"MLflow tracking server {uri} answered {response.status}")
        except (urllib.error.URLError, OSError) as err:
            raise TrackingUnavailableError(
                f"MLflow tracking server {uri} is unreachable ({err}); start it (`mlflow server --host "
                "127.0.0.1 --port 5000`), use the local store (drop logger.mlflow.tracking_uri), or set "
                "logger.mlflow.on_unavailable=local to train with the local store whenever the server is down"
            ) from err


def local_store(cfg: DictConfig) -> dict[str, str]:
    """The default local MLflow store (conf/logger/mlflow.yaml) of this config's output root."""
    root = Path(cfg.paths.output_root)
    return {"tracking_uri": f"sqlite:///{root}/mlflow.db", "artifact_location": str(root / "mlartifacts")}


def existing_run(tracking_uri: str, run_id: str) -> bool:
    """Whether ``run_id`` is a run of this tracking store (a resumed checkpoint names its run)."""
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri).get_run(run_id)
    except Exception as err:  # noqa: BLE001 (not found, or another store)
        log.warning("MLflow run %s is not in %s (%s): starting a new run", run_id, tracking_uri, err)
        return False
    return True


def build_loggers(cfg: DictConfig, run_id: str | None = None) -> list[Logger]:
    """Instantiate ``cfg.logger``; MLflow stores are checked first (fail fast, or local fallback).

    ``logger.<name>.on_unavailable``: ``fail`` (default) raises TrackingUnavailableError naming the
    URI; ``local`` warns and logs to the local SQLite store instead. It is not passed to the logger.
    ``run_id`` (a resumed run's) is continued when the store holds it, else a new run starts.
    """
    loggers: list[Logger] = []
    for name, logger_cfg in (cfg.get("logger") or {}).items():
        if not isinstance(logger_cfg, DictConfig) or "_target_" not in logger_cfg:
            continue
        kwargs: dict[str, Any] = {}
        check_logger_package(str(name), str(logger_cfg._target_))
        if "MLFlowLogger" in logger_cfg._target_:
            logger_cfg = OmegaConf.create(OmegaConf.to_container(logger_cfg, resolve=True))
            on_unavailable = logger_cfg.pop("on_unavailable", "fail")
            if on_unavailable not in ON_UNAVAILABLE:
                raise ValueError(
                    f"logger.{name}.on_unavailable={on_unavailable!r}; use one of {list(ON_UNAVAILABLE)}"
                )
            try:
                check_tracking_uri(logger_cfg.tracking_uri)
            except TrackingUnavailableError as err:
                if on_unavailable != "local":
                    raise
                local = local_store(cfg)
                message = (
                    f"{err}. logger.{name}.on_unavailable=local: tracking to {local['tracking_uri']} instead"
                )
                log.warning(message)
                warnings.warn(message, UserWarning, stacklevel=2)
                logger_cfg = OmegaConf.merge(logger_cfg, local)
                check_tracking_uri(logger_cfg.tracking_uri)
            if str(logger_cfg.tracking_uri).startswith("http"):
                logger_cfg = OmegaConf.merge(logger_cfg, {"artifact_location": None})
            if run_id and existing_run(str(logger_cfg.tracking_uri), run_id):
                kwargs["run_id"] = run_id
        try:
            loggers.append(instantiate(logger_cfg, **kwargs))
        except Exception as err:  # the message of a bad logger config should say which one
            raise RuntimeError(f"could not create logger.{name}: {err}") from err
    return loggers


def git_commit(root: str | Path) -> str:
    """HEAD commit of the project, with '-dirty' when the tree has uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def mlflow_loggers(loggers: list[Logger]) -> list[MLFlowLogger]:
    return [lg for lg in loggers if isinstance(lg, MLFlowLogger)]


def opened_run_id(logger: MLFlowLogger) -> str | None:
    """The logger's MLflow run id once the run exists, None before (never creating a run just to ask).

    segldm's logger knows (:attr:`ResilientMLFlowLogger.opened_run_id`); Lightning's own MLFlowLogger
    only has ``run_id``, which creates the run when it is not there yet.
    """
    return logger.opened_run_id if isinstance(logger, ResilientMLFlowLogger) else logger.run_id


@dataclass(frozen=True)
class TrackedRun:
    """The MLflow run a job logs into, read through public API: what the run folder records
    (``mlflow_run.json``), a sweep's marker stores and the final report prints."""

    run_id: str
    tracking_uri: str
    client: Any  # the logger's MlflowClient (segldm's retrying one for ResilientMLFlowLogger)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)


def tracked_run(loggers: list[Logger]) -> TrackedRun | None:
    """The run of the first MLflow logger (opened if not yet), None without one; global rank 0 only."""
    runs = mlflow_loggers(loggers)
    if not runs:
        return None
    client = runs[0].experiment
    return TrackedRun(str(runs[0].run_id), str(client.tracking_uri), client)


def tracking_callbacks(loggers: list[Logger]) -> list[L.Callback]:
    """What the loggers need from the Trainer: queued MLflow batches flushed before each checkpoint."""
    return [FlushBeforeCheckpoint()] if any(isinstance(lg, ResilientMLFlowLogger) for lg in loggers) else []


def task_overrides() -> list[str]:
    """The command line's task overrides (``segldm.overrides`` tag); none outside a Hydra app."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def log_run_metadata(loggers: list[Logger], cfg: DictConfig, overrides: list[str], output_dir: str) -> None:
    """Params for every logger; config YAML, overrides, commit and locations for every MLflow logger."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for lg in loggers:
        lg.log_hyperparams(_without_hydra(container))
    for lg in mlflow_loggers(loggers):
        client, run_id = lg.experiment, lg.run_id
        tags = {
            "segldm.overrides": " ".join(overrides) or "(none)",
            "mlflow.source.git.commit": git_commit(cfg.paths.root_dir),
            "segldm.output_dir": output_dir,
            "segldm.checkpoint_dir": str(Path(output_dir) / "checkpoints"),
            "segldm.task": str(cfg.task_name),
            "segldm.model": str(cfg.model._target_).rsplit(".", 1)[-1],
        }
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "config.yaml"
            path.write_text(OmegaConf.to_yaml(OmegaConf.create(_without_hydra(container))))
            client.log_artifact(run_id, str(path), artifact_path="config")


# an exception that ends a run by a signal or a user's interrupt, not by a failure
KILLED_EXCEPTIONS: tuple[type[BaseException], ...] = (KeyboardInterrupt, SystemExit)


def final_status(error: BaseException | None) -> str:
    """The MLflow status of a run that ended with ``error`` (None: it ended normally)."""
    if error is None:
        return "FINISHED"
    if isinstance(error, SystemExit) and error.code in (None, 0):
        return "FINISHED"
    return "KILLED" if isinstance(error, KILLED_EXCEPTIONS) else "FAILED"


def end_open_runs(loggers: list[Logger], error: BaseException | None) -> None:
    """End every MLflow run of ``loggers`` still RUNNING: FINISHED, FAILED or KILLED by how the process ends.

    Lightning ends the run at the end of fit and on an exception inside it; this covers every other
    exit: an error before or after fit, a signal outside the training loop, and fast_dev_run (which
    swaps the loggers out, so nobody else would end the run).
    """
    for lg in mlflow_loggers(loggers):
        run_id = opened_run_id(lg)
        if not run_id:  # the run was never created
            continue
        try:
            client = lg.client if isinstance(lg, ResilientMLFlowLogger) else lg.experiment
            if client.get_run(run_id).info.status != "RUNNING":
                continue
            status = getattr(lg, "terminal_status", None) or final_status(error)
            if hasattr(lg, "flush"):
                lg.flush()
            client.set_terminated(run_id, status)
        except Exception as err:  # noqa: BLE001 (never hide the error that ended the run)
            log.warning("could not end MLflow run %s: %s", run_id, err)


@contextlib.contextmanager
def runs_ended(loggers: list[Logger]) -> Any:
    """Within the block, every MLflow run ``loggers`` opens is ended on the way out, however it goes."""
    try:
        yield loggers
    except BaseException as err:
        end_open_runs(loggers, err)
        raise
    end_open_runs(loggers, None)


def log_checkpoints(loggers: list[Logger], last: str | None, best: str | None) -> None:
    for lg in mlflow_loggers(loggers):
        if last:
            lg.experiment.set_tag(lg.run_id, "segldm.last_checkpoint", last)
        if best:
            lg.experiment.set_tag(lg.run_id, "segldm.best_checkpoint", best)


def _without_hydra(container: Any) -> dict[str, Any]:
    return {k: v for k, v in container.items() if k != "hydra"}
