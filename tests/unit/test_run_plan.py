"""segldm.runtime.run_plan decides fresh / resume / init_from once; segldm.train.run_callbacks lists
the callbacks; the tracked MLflow run is read through public API only."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from mlflow.tracking import MlflowClient

from segldm.config.run_folder import resumes_automatically
from segldm.runtime.preemption import PreemptionCheckpoint
from segldm.runtime.resume import MLFLOW_RUN_FILE, TrainingState
from segldm.runtime.run_plan import RunPlan, plan_run
from segldm.storage.atomic import atomic_save
from segldm.storage.checkpoint_files import CheckpointError
from segldm.tracking.logger import create_sqlite_store, opened_run_id, tracked_run
from segldm.tracking.resilient import FlushBeforeCheckpoint, ResilientMLFlowLogger
from segldm.train import run_callbacks
from segldm.training.guards import FiniteGradients
from tests.conftest import TINY_DATA, TINY_FIRST_STAGE, TINY_UNET, compose_train


def _cfg(tmp_path: Path, *overrides: str):
    return compose_train(
        [
            *TINY_DATA,
            *TINY_FIRST_STAGE,
            *TINY_UNET,
            "model.first_stage.ckpt_path=null",
            "model.require_pretrained_first_stage=false",
            f"paths.output_root={tmp_path}",
            f"paths.output_dir={tmp_path}/run",
            *overrides,
        ]
    )


def _resumable(path: Path, step: int, run_id: str | None = None) -> Path:
    atomic_save(
        {
            "state_dict": {"w": torch.zeros(2)},
            "global_step": step,
            "optimizer_states": [{}],
            "loops": {},
            "callbacks": {TrainingState.__qualname__: {"mlflow_run_id": run_id}},
            "segldm": {"kind": "ldm", "config": None},
        },
        path,
    )
    return path


# ------------------------------------------------------------------------------------ the decision
def test_nothing_asked_is_a_fresh_run(tmp_path):
    plan = plan_run(_cfg(tmp_path))
    assert plan.start == "fresh"
    assert (plan.ckpt_path, plan.init_from, plan.mlflow_run_id) == (None, None, None)
    assert plan.output_dir == tmp_path / "run" and not plan.throwaway


@pytest.mark.parametrize(
    ("resume", "ckpt_path", "auto"),
    [
        (None, None, False),
        ("auto", None, True),
        (None, "last", True),
        ("auto", "last", True),
        (None, "/a.ckpt", False),
    ],
)
def test_the_auto_rule_is_stated_once(resume, ckpt_path, auto):
    assert resumes_automatically(resume, ckpt_path) is auto


def test_init_from_starts_a_new_run_from_weights(tmp_path):
    plan = plan_run(_cfg(tmp_path, "init_from=/weights/model.ckpt"))
    assert plan.start == "init_from" and plan.init_from == "/weights/model.ckpt" and plan.ckpt_path is None


@pytest.mark.parametrize("mode", ["resume=auto", "ckpt_path=last"])
def test_auto_resume_without_a_checkpoint_starts_fresh_keeping_init_from_and_the_mlflow_run(tmp_path, mode):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / MLFLOW_RUN_FILE).write_text(
        json.dumps({"run_id": "r0", "tracking_uri": "sqlite:///x"})
    )
    plan = plan_run(_cfg(tmp_path, mode, "init_from=/weights/model.ckpt"))
    assert plan.start == "init_from" and plan.init_from == "/weights/model.ckpt"
    assert plan.ckpt_path is None and plan.mlflow_run_id == "r0" and "no checkpoint" in plan.reason


def test_auto_resume_with_a_checkpoint_resumes_it_and_does_not_load_init_from(tmp_path, caplog):
    ckpts = tmp_path / "run" / "checkpoints"
    _resumable(ckpts / "step0000002.ckpt", 2, run_id="run-1")
    time.sleep(0.01)
    newest = _resumable(ckpts / "step0000004.ckpt", 4, run_id="run-1")
    with caplog.at_level(logging.INFO, logger="segldm.runtime.run_plan"):
        plan = plan_run(_cfg(tmp_path, "resume=auto", "init_from=/weights/model.ckpt"))
    assert plan.start == "resume" and plan.init_from is None
    assert (plan.ckpt_path, plan.global_step, plan.mlflow_run_id) == (str(newest), 4, "run-1")
    assert "init_from=/weights/model.ckpt is not loaded" in caplog.text
    assert f"resume=auto: {newest} (global step 4)" in caplog.text


def test_an_explicit_checkpoint_is_resumed(tmp_path):
    path = _resumable(tmp_path / "other.ckpt", 6, run_id="abc")
    plan = plan_run(_cfg(tmp_path, f"ckpt_path={path}"))
    assert plan.start == "resume"
    assert (plan.ckpt_path, plan.global_step, plan.mlflow_run_id) == (str(path), 6, "abc")


def test_init_from_with_an_explicit_checkpoint_is_refused_before_any_file_is_read(tmp_path):
    with pytest.raises(CheckpointError, match="init_from=/w.ckpt and ckpt_path=/missing.ckpt are both set"):
        plan_run(_cfg(tmp_path, "init_from=/w.ckpt", "ckpt_path=/missing.ckpt"))


def test_a_throwaway_run_has_no_loggers(tmp_path):
    plan = plan_run(_cfg(tmp_path, "trainer=debug"))
    assert plan.throwaway and plan.loggers(_cfg(tmp_path, "trainer=debug")) == []


# ------------------------------------------------------------------------------------ callbacks, one list
def test_callbacks_are_listed_in_one_place_with_their_two_rules(tmp_path):
    cfg = _cfg(tmp_path)  # conf/callbacks/default.yaml: checkpoints, LR monitor, ...
    kinds = {type(c) for c in run_callbacks(cfg, [CSVLogger(tmp_path)], throwaway=False)}
    assert {LearningRateMonitor, TrainingState, PreemptionCheckpoint, FiniteGradients} <= kinds
    assert any(issubclass(k, ModelCheckpoint) for k in kinds)
    without_logger = run_callbacks(cfg, [], throwaway=False)
    assert not any(isinstance(c, LearningRateMonitor) for c in without_logger)  # Lightning refuses it
    throwaway = run_callbacks(cfg, [CSVLogger(tmp_path)], throwaway=True)
    assert not any(isinstance(c, ModelCheckpoint | PreemptionCheckpoint) for c in throwaway)
    assert any(isinstance(c, TrainingState) for c in throwaway)


# ------------------------------------------------------------------------------------ tracking, public API
@pytest.fixture()
def store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    create_sqlite_store(uri)
    return uri


def test_the_tracked_run_is_read_without_private_attributes(store, tmp_path):
    logger = ResilientMLFlowLogger(experiment_name="plan", tracking_uri=store, synchronous=True)
    client = MlflowClient(store)
    assert opened_run_id(logger) is None  # asking does not create the run
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
    run = tracked_run([CSVLogger(tmp_path), logger])
    assert run is not None and run.tracking_uri == store and run.run_id == logger.run_id
    assert opened_run_id(logger) == run.run_id and client.get_run(run.run_id).info.status == "RUNNING"
    assert tracked_run([CSVLogger(tmp_path)]) is None
    continued = ResilientMLFlowLogger(
        experiment_name="plan", tracking_uri=store, run_id=run.run_id, synchronous=True
    )
    assert opened_run_id(continued) == run.run_id  # known before it is reopened


def test_start_tracking_records_the_run_and_where_it_resumed_from(store, tmp_path):
    cfg = _cfg(tmp_path)
    plan = RunPlan(output_dir=tmp_path / "run", ckpt_path="/ckpts/last.ckpt", global_step=4)
    logger = ResilientMLFlowLogger(experiment_name="plan", tracking_uri=store, synchronous=True)
    run = plan.start_tracking(cfg, [logger], is_global_zero=True)
    assert run is not None
    record = json.loads((tmp_path / "run" / MLFLOW_RUN_FILE).read_text())
    assert record == {"run_id": run.run_id, "tracking_uri": store}
    tags = MlflowClient(store).get_run(run.run_id).data.tags
    assert tags["segldm.resumed_from"] == "/ckpts/last.ckpt (step 4)"
    assert plan.start_tracking(cfg, [logger], is_global_zero=False) is None  # other ranks record nothing
    assert any(isinstance(c, FlushBeforeCheckpoint) for c in run_callbacks(cfg, [logger], throwaway=False))
