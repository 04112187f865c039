"""Hydra multiruns as first-class sweeps: one id per sweep, MLflow tags, and resume by skipping.

Every job of `python -m segldm.train -m ...` belongs to a sweep whose id is `sweep.id`, or, when
that is null, the sweep folder (`hydra.sweep.dir`) relative to `paths.output_root`. A job is
identified inside its sweep by a key: the hash of its task overrides (normalised by Hydra's
parser, so `1e-5` and `1.0e-05` are the same job; `sweep.*`, `resume` and `ckpt_path` are left out).

- Tags: the job's MLflow run gets `segldm.sweep_id`, `segldm.sweep_key`, `segldm.sweep_job` and
  `segldm.sweep_dir`, so `mlflow ui` can group or filter a sweep's runs.
- Resume: a finished job writes `sweep_job.json` (status, objective, final metrics, run id) into
  its output folder. When the same sweep is run again (same `hydra.sweep.dir`, or the same
  `sweep.id`), a job whose key already FINISHED — found in a marker under the sweep folder or as
  a FINISHED MLflow run with the same id and key — is not trained again: it returns the recorded
  objective (so Optuna sees the same history) and the sweep goes on with the others.
- One store, many writers: `SweepCallback.on_multirun_start` runs in the launching process before
  any job starts and creates the MLflow tables and the experiment once, so parallel jobs only
  insert rows (no two processes race to run migrations or create the experiment).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from segldm.sweeps.markers import MANIFEST_NAME, MARKER_NAME, read_marker, write_marker
from segldm.sweeps.report import report_sweep_dir
from segldm.tracking.logger import check_tracking_uri

log = logging.getLogger(__name__)

FINISHED = "FINISHED"
# Keys that say how to run the sweep or resume a job, not what a job computes: not part of its key
# (so a sweep re-run with resume=auto still finds its finished jobs).
KEY_EXCLUDED_PREFIXES = ("sweep.",)
KEY_EXCLUDED_KEYS = frozenset({"resume", "ckpt_path"})


class SweepError(RuntimeError):
    """A sweep setting that cannot work; the message names the key and the way out."""


def normalized_overrides(overrides: list[str]) -> list[str]:
    """`key=value` strings with values as Hydra parses them, sorted; `sweep.*` keys dropped."""
    parser = OverridesParser.create()
    normalized = []
    for text in overrides:
        try:
            override = parser.parse_override(text)
            key = override.get_key_element()
            item = f"{key}={override.value()!r}"
        except Exception:  # not parseable on its own (should not happen for Hydra's own overrides)
            key, item = text.split("=", 1)[0], text
        bare = key.lstrip("+~")
        if bare.startswith(KEY_EXCLUDED_PREFIXES) or bare in KEY_EXCLUDED_KEYS:
            continue
        normalized.append(item)
    return sorted(normalized)


def job_key(overrides: list[str]) -> str:
    """What identifies a job inside its sweep: a hash of its normalised overrides."""
    return hashlib.sha1("\n".join(normalized_overrides(overrides)).encode()).hexdigest()[:16]


def default_sweep_id(sweep_dir: str | Path, output_root: str | Path) -> str:
    """The sweep folder relative to the output root (absolute when it lies elsewhere)."""
    sweep_dir, output_root = Path(sweep_dir).resolve(), Path(output_root).resolve()
    try:
        return str(sweep_dir.relative_to(output_root))
    except ValueError:
        return str(sweep_dir)


@dataclass
class SweepJob:
    """One job of a sweep, as Hydra launched it."""

    sweep_id: str
    key: str
    overrides: list[str]
    output_dir: str
    sweep_dir: str | None
    job_num: int | None
    objective: str
    run_name: str | None = None

    @classmethod
    def from_hydra(cls, cfg: DictConfig) -> SweepJob | None:
        """The current job when it runs in a multirun (or names a `sweep.id`), else None."""
        if not HydraConfig.initialized():
            return None
        hydra_cfg = HydraConfig.get()
        sweep_cfg = cfg.get("sweep") or {}
        explicit_id = sweep_cfg.get("id")
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        if not multirun and explicit_id is None:
            return None
        sweep_dir = str(Path(hydra_cfg.sweep.dir).resolve()) if multirun else None
        sweep_id = (
            str(explicit_id)
            if explicit_id is not None
            else default_sweep_id(sweep_dir or hydra_cfg.runtime.output_dir, cfg.paths.output_root)
        )
        if "'" in sweep_id or '"' in sweep_id:
            raise SweepError(f"sweep.id={sweep_id!r} must not contain quotes; choose a plain name")
        overrides = list(hydra_cfg.overrides.task)
        return cls(
            sweep_id=sweep_id,
            key=job_key(overrides),
            overrides=overrides,
            output_dir=str(Path(hydra_cfg.runtime.output_dir).resolve()),
            sweep_dir=sweep_dir,
            job_num=int(hydra_cfg.job.num) if multirun else None,
            objective=str(sweep_cfg.get("objective") or "val/loss"),
            run_name=cfg.get("run_name"),
        )

    def tags(self) -> dict[str, str]:
        tags = {
            "segldm.sweep_id": self.sweep_id,
            "segldm.sweep_key": self.key,
            "segldm.sweep_overrides": json.dumps(self.overrides),
        }
        if self.job_num is not None:  # one run name per job: `<run_name or sweep>-<job>`
            tags["segldm.sweep_job"] = str(self.job_num)
            tags["mlflow.runName"] = f"{self.run_name or Path(self.sweep_id).name}-{self.job_num}"
        if self.sweep_dir is not None:
            tags["segldm.sweep_dir"] = self.sweep_dir
        return tags


# ---------------------------------------------------------------------------------------- resume
def find_finished(job: SweepJob, cfg: DictConfig) -> dict[str, Any] | None:
    """The record of a FINISHED job with this sweep id and key: a marker file, else an MLflow run."""
    candidates = [Path(job.output_dir) / MARKER_NAME]
    if job.sweep_dir is not None:
        candidates += sorted(Path(job.sweep_dir).glob(f"*/{MARKER_NAME}"))
    for path in candidates:
        record = read_marker(path)
        if (
            record
            and record.get("status") == FINISHED
            and record.get("sweep_id") == job.sweep_id
            and record.get("key") == job.key
        ):
            return record
    return _find_finished_mlflow(job, cfg)


def _find_finished_mlflow(job: SweepJob, cfg: DictConfig) -> dict[str, Any] | None:
    mlflow_cfg = (cfg.get("logger") or {}).get("mlflow")
    if not mlflow_cfg:
        return None
    uri = str(mlflow_cfg.tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None  # no store yet: nothing finished (and do not create one here)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(str(mlflow_cfg.experiment_name))
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=(
            f"tags.`segldm.sweep_id` = '{job.sweep_id}' and tags.`segldm.sweep_key` = '{job.key}' "
            "and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.end_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    run = runs[0]
    return {
        "status": FINISHED,
        "sweep_id": job.sweep_id,
        "key": job.key,
        "objective_name": job.objective,
        "objective": run.data.metrics.get(job.objective),
        "metrics": dict(run.data.metrics),
        "run_id": run.info.run_id,
        "tracking_uri": uri,
        "output_dir": run.data.tags.get("segldm.output_dir"),
        "overrides": job.overrides,
    }


def record_finished(job: SweepJob, result: dict[str, Any], duration_s: float) -> dict[str, Any]:
    """The marker of a job that trained to the end (written by global rank 0 only)."""
    metrics = result.get("metrics", {})
    record = {
        **asdict(job),
        "status": FINISHED,
        "objective_name": job.objective,
        "objective": metrics.get(job.objective),
        "metrics": metrics,
        "duration_s": round(duration_s, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run_id": result.get("mlflow_run_id"),
        "tracking_uri": result.get("tracking_uri"),
        "last_checkpoint": result.get("last_checkpoint"),
    }
    write_marker(Path(job.output_dir) / MARKER_NAME, record)
    return record


def reuse_finished(job: SweepJob, record: dict[str, Any]) -> float | None:
    """Skip a finished job: say so, leave a marker in this job's folder, return its objective."""
    where = record.get("run_id") or record.get("output_dir")
    log.info("sweep %s: job %s already FINISHED (%s); not training it again", job.sweep_id, job.key, where)
    print(
        f"sweep {job.sweep_id} job {job.job_num} (key {job.key}) already finished (run {where}); "
        f"not training it again: {job.objective}={record.get('objective')}",
        flush=True,
    )
    if Path(str(record.get("output_dir") or "")).resolve() != Path(job.output_dir):
        reused = {**record, **asdict(job), "reused_from": record.get("output_dir")}
        reused["objective"] = record.get("objective")
        write_marker(Path(job.output_dir) / MARKER_NAME, reused)
    objective = record.get("objective")
    return None if objective is None else float(objective)


def tag_runs(loggers: list[Any], job: SweepJob) -> None:
    """Sweep id, key, job number and folder as tags of this job's MLflow run(s)."""
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.entities import RunTag

    for lg in loggers:
        if isinstance(lg, MLFlowLogger) and lg.run_id is not None:
            lg.experiment.log_batch(lg.run_id, tags=[RunTag(k, v) for k, v in job.tags().items()])


# ---------------------------------------------------------------------------------------- store
def prepare_tracking_store(tracking_uri: str, experiment_name: str, artifact_location: str | None) -> str:
    """Create the MLflow tables and the experiment once, before parallel jobs start writing.

    MLflow creates both lazily: N jobs starting together on a fresh SQLite file would all run the
    schema migrations and race to insert the experiment (one wins, the others fail). After this,
    jobs only insert rows, which SQLite serialises (MLflow sets a 20 s busy timeout).
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    check_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    for attempt in range(5):
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            location = artifact_location if not tracking_uri.startswith("http") else None
            return client.create_experiment(experiment_name, artifact_location=location)
        except MlflowException as err:  # created by someone else meanwhile: read it back
            if "already exists" not in str(err) and "UNIQUE constraint" not in str(err):
                raise
            time.sleep(0.2 * (attempt + 1))
    raise SweepError(f"could not create or read MLflow experiment {experiment_name!r} at {tracking_uri}")


def check_sweeper(config: DictConfig) -> None:
    """Refuse sweeper settings that cannot work with the pinned packages, before any job starts."""
    sweeper = config.hydra.get("sweeper") or {}
    if "OptunaSweeper" in str(sweeper.get("_target_", "")) and sweeper.get("storage"):
        raise SweepError(
            f"hydra.sweeper.storage={sweeper.storage!r}: Optuna 2.10.1 (the newest hydra-optuna-sweeper "
            "1.3.0 allows) cannot use an RDB storage next to SQLAlchemy 2.x (which MLflow 3 needs). Keep "
            "hydra.sweeper.storage=null; to resume a search, run the same command with the same "
            "hydra.sweep.dir (or sweep.id): finished trials are not trained again (segldm/sweeps/jobs.py)"
        )


class SweepCallback(Callback):
    """Hydra callback (conf/hydra/default.yaml): prepare the store before a multirun, report after."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_sweeper(config)
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        sweep_cfg = config.get("sweep") or {}
        sweep_id = sweep_cfg.get("id") or default_sweep_id(sweep_dir, config.paths.output_root)
        manifest: dict[str, Any] = {
            "sweep_id": str(sweep_id),
            "sweep_dir": str(sweep_dir),
            "command": shlex.join(["python", "-m", "segldm.train", *sys.argv[1:]]),
            "objective": str(sweep_cfg.get("objective") or "val/loss"),
            "direction": str(sweep_cfg.get("direction") or "minimize"),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        mlflow_cfg = (config.get("logger") or {}).get("mlflow")
        if mlflow_cfg:
            uri, name = str(mlflow_cfg.tracking_uri), str(mlflow_cfg.experiment_name)
            location = mlflow_cfg.get("artifact_location")
            manifest["experiment_id"] = prepare_tracking_store(uri, name, location)
            manifest.update(tracking_uri=uri, experiment_name=name)
        previous = read_marker(sweep_dir / MANIFEST_NAME)
        if previous:  # a resumed sweep keeps its first start time
            manifest["started_at"] = previous.get("started_at", manifest["started_at"])
            manifest["resumed_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_marker(sweep_dir / MANIFEST_NAME, manifest)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_cfg = config.get("sweep") or {}
        if not sweep_cfg.get("report", True):
            return
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        try:
            report_sweep_dir(sweep_dir, metric=sweep_cfg.get("objective") or "val/loss")
        except Exception as err:  # the sweep itself succeeded; say how to get the report
            log.warning("sweep report failed (%s); run `python -m segldm.report %s` to retry", err, sweep_dir)
