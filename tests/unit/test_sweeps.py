"""segldm.sweeps in-process: job keys, sweep ids, finding finished jobs in markers and in MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from segldm.config.resolvers import num_devices
from segldm.sweeps.jobs import (
    SweepJob,
    default_sweep_id,
    find_finished,
    job_key,
    prepare_tracking_store,
    reuse_finished,
)
from segldm.sweeps.markers import MARKER_NAME, write_marker
from segldm.training.lr_schedulers import ConstantScheduler, CosineScheduler, LambdaLinearScheduler


def test_job_key_ignores_order_spelling_and_how_to_run_keys():
    a = job_key(["model.optimization.base_learning_rate=1e-5", "scheduler.warm_up_steps=1000", "trainer=cpu"])
    b = job_key(
        ["trainer=cpu", "scheduler.warm_up_steps=1000", "model.optimization.base_learning_rate=1.0e-05"]
    )
    c = job_key(
        [
            "model.optimization.base_learning_rate=1e-5",
            "scheduler.warm_up_steps=1000",
            "trainer=cpu",
            "sweep.id=x",
        ]
    )
    d = job_key(
        [
            "model.optimization.base_learning_rate=1e-5",
            "scheduler.warm_up_steps=1000",
            "trainer=cpu",
            "resume=auto",
        ]
    )
    assert a == b == c == d  # sweep.* and resume/ckpt_path say how to run, not what is computed
    assert (
        job_key(["model.optimization.base_learning_rate=1e-4", "scheduler.warm_up_steps=1000", "trainer=cpu"])
        != a
    )
    assert job_key(["+callbacks.x.y=1"]) != job_key(["callbacks.x.y=1"])  # Hydra's +/~ prefixes count


def test_default_sweep_id_is_relative_to_the_output_root(tmp_path):
    assert (
        default_sweep_id(tmp_path / "outputs/multiruns/train/t1", tmp_path / "outputs")
        == "multiruns/train/t1"
    )
    assert default_sweep_id("/elsewhere/sweep", tmp_path / "outputs") == "/elsewhere/sweep"


def _job(sweep_dir: Path, num: int, overrides: list[str], sweep_id: str = "s1") -> SweepJob:
    return SweepJob(
        sweep_id=sweep_id,
        key=job_key(overrides),
        overrides=overrides,
        output_dir=str(sweep_dir / str(num)),
        sweep_dir=str(sweep_dir),
        job_num=num,
        objective="val/loss",
    )


def _cfg(tmp_path: Path, with_mlflow: bool = True):
    logger = {"mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment_name": "sweeps"}}
    return OmegaConf.create({"logger": logger if with_mlflow else {}})


def test_finished_marker_anywhere_in_the_sweep_folder_is_found(tmp_path):
    sweep = tmp_path / "sweep"
    done = _job(sweep, 0, ["model.optimization.base_learning_rate=1e-4"])
    write_marker(
        Path(done.output_dir) / MARKER_NAME, {**done.__dict__, "status": "FINISHED", "objective": 0.5}
    )
    # the same overrides as job 5 of a resumed sweep (Optuna numbers jobs differently)
    again = _job(sweep, 5, ["model.optimization.base_learning_rate=0.0001"])
    record = find_finished(again, _cfg(tmp_path, with_mlflow=False))
    assert record is not None and record["objective"] == 0.5
    assert (
        find_finished(_job(sweep, 6, ["model.optimization.base_learning_rate=1e-3"]), _cfg(tmp_path, False))
        is None
    )
    assert (
        find_finished(
            _job(sweep, 7, ["model.optimization.base_learning_rate=1e-4"], "other"), _cfg(tmp_path, False)
        )
        is None
    )
    # a marker that is not FINISHED does not count
    write_marker(Path(done.output_dir) / MARKER_NAME, {**done.__dict__, "status": "RUNNING"})
    assert find_finished(again, _cfg(tmp_path, with_mlflow=False)) is None


def test_finished_mlflow_run_is_found_and_reused_in_a_new_folder(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    uri = cfg.logger.mlflow.tracking_uri
    assert find_finished(_job(tmp_path / "a", 0, ["x=1"]), cfg) is None  # no store yet, none created
    assert not Path(uri.removeprefix("sqlite:///")).exists()
    experiment_id = prepare_tracking_store(uri, "sweeps", None)
    assert prepare_tracking_store(uri, "sweeps", None) == experiment_id  # idempotent
    client = MlflowClient(tracking_uri=uri)
    original = _job(tmp_path / "first", 0, ["x=1"])
    failed = client.create_run(experiment_id, tags=original.tags())
    client.set_terminated(failed.info.run_id, "FAILED")
    resumed = _job(tmp_path / "second", 3, ["x=1"])  # same sweep id, another folder: no marker there
    assert find_finished(resumed, cfg) is None  # a FAILED run is not finished
    run = client.create_run(experiment_id, tags={**original.tags(), "segldm.output_dir": original.output_dir})
    client.log_metric(run.info.run_id, "val/loss", 0.25, step=3)
    client.set_terminated(run.info.run_id, "FINISHED")

    record = find_finished(resumed, cfg)
    assert record["run_id"] == run.info.run_id and record["objective"] == 0.25
    assert reuse_finished(resumed, record) == 0.25
    marker = json.loads((Path(resumed.output_dir) / MARKER_NAME).read_text())
    assert marker["reused_from"] == original.output_dir and marker["job_num"] == 3
    assert "already finished" in capsys.readouterr().out


@pytest.mark.parametrize(
    "scheduler",
    [
        LambdaLinearScheduler(warm_up_steps=0, cycle_lengths=1e13, f_start=1e-6, f_max=1.0, f_min=1.0),
        CosineScheduler(warm_up_steps=0, max_steps=100),
        ConstantScheduler(warm_up_steps=0, f_start=0.0),
    ],
    ids=["lambda_linear", "cosine", "constant"],
)
def test_zero_warm_up_starts_at_the_full_rate(scheduler):
    assert scheduler(0) == pytest.approx(1.0) and scheduler(1) == pytest.approx(1.0, abs=1e-3)


def test_num_devices_resolver_needs_a_count():
    assert num_devices(4) == 4 and num_devices([0, 1]) == 2
    with pytest.raises(ValueError, match="trainer.devices='auto'.*trainer=ddp trainer.devices=4"):
        num_devices("auto")
