"""MLflow tracking: logger construction with fail-fast URI checks, and what every run records.

A run records the resolved config (params + YAML artifact), the Hydra override string and git
commit (tags), the output and checkpoint locations (tags), losses and lr per step (Lightning),
and sample grids (artifacts, from the SampleGridLogger callback).
"""

from __future__ import annotations

import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, MLFlowLogger
from omegaconf import DictConfig, OmegaConf


class TrackingUnavailableError(RuntimeError):
    """The configured MLflow tracking server cannot be reached."""


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Create the SQLite store's folder, or make sure an HTTP tracking server answers."""
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
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
                "127.0.0.1 --port 5000`) or use the local store (drop logger.mlflow.tracking_uri)"
            ) from err


def build_loggers(cfg: DictConfig) -> list[Logger]:
    loggers: list[Logger] = []
    for name, logger_cfg in (cfg.get("logger") or {}).items():
        if not isinstance(logger_cfg, DictConfig) or "_target_" not in logger_cfg:
            continue
        if "MLFlowLogger" in logger_cfg._target_:
            check_tracking_uri(logger_cfg.tracking_uri)
            if str(logger_cfg.tracking_uri).startswith("http"):
                logger_cfg = OmegaConf.merge(logger_cfg, {"artifact_location": None})
        try:
            loggers.append(instantiate(logger_cfg))
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


def log_run_metadata(loggers: list[Logger], cfg: DictConfig, overrides: list[str], output_dir: str) -> None:
    """Params, config YAML, overrides, commit and locations for every MLflow logger."""
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


def log_checkpoints(loggers: list[Logger], last: str | None, best: str | None) -> None:
    for lg in mlflow_loggers(loggers):
        if last:
            lg.experiment.set_tag(lg.run_id, "segldm.last_checkpoint", last)
        if best:
            lg.experiment.set_tag(lg.run_id, "segldm.best_checkpoint", best)


def _without_hydra(container: Any) -> dict[str, Any]:
    return {k: v for k, v in container.items() if k != "hydra"}
