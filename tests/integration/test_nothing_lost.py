"""Nothing lost, nothing misleading: debug runs, concurrent runs, MLflow run states, checkpoint and start-up errors.

Each test is one case of issue 22, run the way a user runs it (the real entry points in a
subprocess) where the case is about what a user sees, in-process where it is about one mechanism.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.tracking import MlflowClient

from segldm.runtime.preemption import TerminatedBeforeTraining, exit_on_signals
from segldm.runtime.run_lock import LOCK_FILE, RunFolderBusy, run_folder_lock
from segldm.storage.checkpoint_files import CheckpointError, read_checkpoint
from segldm.tracking.logger import create_sqlite_store, runs_ended
from tests.conftest import REPO, TINY_DATA, TINY_FIRST_STAGE, TINY_TRAINER, run_train

AUTOENCODER = [
    "model=autoencoder",
    *TINY_FIRST_STAGE,
    *TINY_DATA,
    *TINY_TRAINER,
    "scheduler=constant",
]


def _run(module: str, args: list[str], root: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env={**os.environ, "SEGLDM_ROOT": str(root), "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


# ------------------------------------------------------------------------------------ 1, 2: debug runs
def test_debug_run_never_writes_into_a_pinned_real_run_and_opens_no_mlflow_run(tmp_path):
    real = tmp_path / "outputs/real"
    (real / "checkpoints").mkdir(parents=True)
    (real / ".hydra").mkdir()
    (real / "checkpoints/last.ckpt").write_bytes(b"the real run's step-1200 checkpoint")
    (real / ".hydra/overrides.yaml").write_text("- experiment=quickstart\n")
    before = {p: p.read_bytes() for p in real.rglob("*") if p.is_file()}

    run_train([*AUTOENCODER, "trainer=debug", "hydra.run.dir=${paths.output_root}/real"], tmp_path)

    assert {p: p.read_bytes() for p in real.rglob("*") if p.is_file()} == before
    debug_runs = list((tmp_path / "outputs/debug/train").iterdir())
    assert len(debug_runs) == 1 and (debug_runs[0] / ".hydra/overrides.yaml").is_file()
    assert not list((tmp_path / "outputs").rglob("*.ckpt"))[1:]  # only the real run's file
    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs == []  # a throw-away run opens none, so none is left RUNNING


# ------------------------------------------------------------------------------------ MLflow run states
@pytest.fixture()
def store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    create_sqlite_store(uri)
    return uri


def _opened_logger(uri: str) -> MLFlowLogger:
    logger = MLFlowLogger(experiment_name="states", tracking_uri=uri)
    logger.experiment  # noqa: B018 (creates the run, as segldm.train's metadata logging does)
    return logger


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (None, "FINISHED"),
        (RuntimeError("boom"), "FAILED"),
        (KeyboardInterrupt(), "KILLED"),
        (SystemExit(143), "KILLED"),
    ],
)
def test_every_exit_path_ends_the_mlflow_run(store, error, status):
    logger = _opened_logger(store)
    with pytest.raises(type(error)) if error is not None else _no_error(), runs_ended([logger]):
        if error is not None:
            raise error
    assert MlflowClient(store).get_run(logger.run_id).info.status == status


def test_sigterm_during_set_up_ends_the_run_killed(store):
    logger = _opened_logger(store)
    with (
        pytest.raises(TerminatedBeforeTraining) as exited,
        runs_ended([logger]),
        exit_on_signals(["SIGTERM"]),
    ):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
    assert exited.value.code == 128 + signal.SIGTERM
    assert MlflowClient(store).get_run(logger.run_id).info.status == "KILLED"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the block


def test_a_run_lightning_already_ended_keeps_its_status(store):
    logger = _opened_logger(store)
    logger.finalize("failed")
    with runs_ended([logger]):
        pass
    assert MlflowClient(store).get_run(logger.run_id).info.status == "FAILED"


class _no_error:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------------------------ 3: one owner per folder
HOLDER = textwrap.dedent(
    """
    import sys, time
    from segldm.runtime.run_lock import run_folder_lock
    with run_folder_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(120)
    """
)


def _hold(folder: Path) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_second_training_into_a_held_folder_is_refused_naming_both_runs(tmp_path):
    folder = tmp_path / "outputs/shared"
    holder = _hold(folder)
    try:
        proc = run_train([*AUTOENCODER, "hydra.run.dir=${paths.output_root}/shared"], tmp_path, check=False)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2
    assert f"run folder {folder} is in use by another training (pid {holder.pid}" in proc.stderr
    assert "this run (pid" in proc.stderr and "hydra.run.dir=${paths.output_root}/shared" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (folder / "checkpoints").exists()


def test_lock_of_a_killed_run_is_taken_over_with_a_note(tmp_path, caplog):
    holder = _hold(tmp_path)
    with pytest.raises(RunFolderBusy), run_folder_lock(tmp_path):
        pass
    holder.send_signal(signal.SIGKILL)  # no clean-up runs: the record stays, the kernel drops the lock
    holder.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid
    with caplog.at_level(logging.WARNING), run_folder_lock(tmp_path) as previous:
        assert previous["pid"] == holder.pid
    assert f"took over the lock of a run that is no longer alive (pid {holder.pid}" in caplog.text
    assert (tmp_path / LOCK_FILE).read_text() == ""  # an ended run leaves no holder
    with run_folder_lock(tmp_path) as previous:
        assert previous is None


def test_a_file_system_without_locks_trains_unguarded_with_a_warning(tmp_path, monkeypatch, caplog):
    def no_locks(fd, operation):
        raise OSError(37, "No locks available")

    monkeypatch.setattr("segldm.runtime.run_lock.fcntl.flock", no_locks)
    with caplog.at_level(logging.WARNING), run_folder_lock(tmp_path) as previous:
        assert previous is None
    assert "cannot be locked ([Errno 37] No locks available)" in caplog.text


# ------------------------------------------------------------------------------------ 4: concurrent first users
CREATOR = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from segldm.tracking.logger import create_sqlite_store
    print("ready", flush=True)
    go = Path(sys.argv[2])
    while not go.exists():
        time.sleep(0.005)
    create_sqlite_store(sys.argv[1])
    """
)


def test_concurrent_first_users_create_the_store_once(tmp_path):
    uri, go = f"sqlite:///{tmp_path}/fresh/mlflow.db", tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CREATOR, uri, str(go)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]  # both wait at the start line
    go.touch()
    outcomes = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outcomes]
    assert MlflowClient(uri).search_experiments()  # the store works (its Default experiment)


# ------------------------------------------------------------------------------------ 5: what a checkpoint file is
def _truncated_zip(path: Path) -> None:
    torch.save({"state_dict": {"w": torch.zeros(3)}}, path)
    path.write_bytes(path.read_bytes()[:-200])


def _zip_without_pickle(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "not a model")


@pytest.mark.parametrize(
    ("write", "says"),
    [
        (lambda p: p.write_text("hello, I am a note\n"), "is not a torch checkpoint: it is a text file"),
        (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
        (
            _truncated_zip,
            "is not a readable torch checkpoint (truncated or corrupt?): it starts like torch.save's zip format",
        ),
        (_zip_without_pickle, "is a zip archive but not a torch checkpoint"),
        (lambda p: p.write_bytes(pickle.dumps({"state_dict": {}})), "is a plain Python pickle"),
    ],
)
def test_a_file_that_is_no_checkpoint_says_what_it_is_without_suggesting_trust(tmp_path, write, says):
    path = tmp_path / "x.ckpt"
    write(path)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path, what="LDM checkpoint")
    assert f"LDM checkpoint {path} {says}" in str(err.value)
    assert "trust_checkpoint" not in str(err.value)


class PickledThing:
    pass


def test_only_pickled_python_objects_suggest_trust_checkpoint(tmp_path):
    path = tmp_path / "objects.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": PickledThing()}, path)
    with pytest.raises(CheckpointError, match="holds pickled Python objects.*trust_checkpoint"):
        read_checkpoint(path)


@pytest.mark.parametrize("module", ["segldm.sample", "segldm.eval"])
def test_sample_and_eval_say_a_text_file_is_no_checkpoint(tmp_path, module):
    bad = tmp_path / "x.ckpt"
    bad.write_text("not a model\n")
    proc = _run(module, [f"ckpt={bad}"], tmp_path)
    assert proc.returncode == 2
    assert f"{bad} is not a torch checkpoint: it is a text file" in proc.stderr
    assert "trust_checkpoint" not in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------ 7, 8: before any work, no traceback
def test_a_value_of_the_wrong_kind_fails_before_any_work(tmp_path):
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, ckpt)
    proc = _run("segldm.eval", [f"ckpt={ckpt}", "eval.bootstrap=0"], tmp_path)
    assert proc.returncode == 2
    assert (
        "eval.bootstrap=0 is a number, but eval.bootstrap is a group of settings (draws, level, seed)"
        in proc.stderr
    )
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs/fid_cache").exists()


def test_start_up_error_prints_its_message_without_traceback_unless_asked(tmp_path):
    args = [*AUTOENCODER, "data.size=50"]
    proc = _run("segldm.train", args, tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: invalid configuration:\n  - data.size=50")
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr
    full = _run("segldm.train", args, tmp_path, HYDRA_FULL_ERROR="1")
    assert full.returncode != 0 and "Traceback" in full.stderr and "data.size=50" in full.stderr
