"""Reliability pieces in-process: atomic checkpoint writes, what a resume picks, data order, random
state, MLflow retries, gradient guard, pre-emption signals and the start-up checks (issue 7).

Faults are injected at real boundaries: the file write (OSError, RLIMIT_FSIZE), a child process
killed while saving, the MLflow store's methods, autograd gradients, signals sent to this process.
"""

from __future__ import annotations

import errno
import os
import random
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch import loops as lightning_loops
from lightning.pytorch.callbacks import ModelCheckpoint
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.tracking import MlflowClient

from segldm.config.run_folder import comparable_overrides, matching_run_folder, run_dir
from segldm.data.datamodule import SegmentationDataModule
from segldm.data.resumable import AugmentationRandomState, ResumableDataLoader
from segldm.data.synthetic import SyntheticScenes
from segldm.runtime.checkpoint_io import AtomicCheckpointIO
from segldm.runtime.checks import ConfigError, ConfigWarning, validate_config
from segldm.runtime.lightning_state import check_lightning_internals
from segldm.runtime.preemption import Preempted, PreemptionCheckpoint, parse_signals
from segldm.runtime.resume import TrainingState, capture_rng, plan_resume, restore_rng
from segldm.storage.atomic import CheckpointWriteError, atomic_save, remove_stale_temp_files, stale_temp_files
from segldm.storage.checkpoint_files import CheckpointError, save_checkpoint
from segldm.tracking.logger import TrackingUnavailableError, build_loggers
from segldm.tracking.resilient import ResilientMLFlowLogger, RetryingClient, TrackingWarning
from segldm.training.guards import FiniteGradients, nonfinite_gradients
from tests.conftest import REPO, TINY_DATA, TINY_FIRST_STAGE, TINY_UNET, compose_train


# ------------------------------------------------------------------------------------ atomic writes
def test_atomic_save_round_trip_leaves_no_temporary_files(tmp_path):
    path = atomic_save({"w": torch.arange(5)}, tmp_path / "sub" / "last.ckpt")
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(5))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable by colleagues as torch.save's files


@pytest.mark.parametrize(
    ("code", "fragment"),
    [(errno.ENOSPC, "the disk is full"), (errno.EACCES, "permission denied"), (errno.EROFS, "read-only")],
)
def test_failed_write_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, code, fragment):
    path = tmp_path / "last.ckpt"
    atomic_save({"step": torch.tensor(1)}, path)
    before = path.read_bytes()

    def half_then_fail(obj, f):  # the disk fills up half-way through the file
        f.write(b"PK\x03\x04 partial bytes")
        raise OSError(code, os.strerror(code))

    with pytest.raises(CheckpointWriteError) as err:
        atomic_save({"step": torch.tensor(2)}, path, save=half_then_fail)
    assert str(path) in str(err.value) and fragment in str(err.value)
    assert "previous checkpoint at that path is intact" in str(err.value)
    assert err.value.errno == code
    assert path.read_bytes() == before and not stale_temp_files(tmp_path)


def test_file_size_limit_is_a_real_write_error_and_keeps_the_previous_file(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse the write (EFBIG), as a full disk would (ENOSPC)."""
    path = tmp_path / "model.ckpt"
    save_checkpoint({"state_dict": {"w": torch.zeros(10)}}, path)  # segldm.convert's writer: the same code
    before = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, hard))
    try:
        with pytest.raises(CheckpointWriteError, match="larger than this process may write"):
            save_checkpoint({"state_dict": {"w": torch.zeros(1_000_000)}}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert path.read_bytes() == before and not stale_temp_files(tmp_path)


WRITER = """
import sys, torch
from segldm.storage.atomic import atomic_save
path, i = sys.argv[1], 0
print("ready", flush=True)
while True:
    i += 1
    atomic_save({"i": torch.tensor(i), "w": torch.full((2_000_000,), float(i))}, path)
"""


def test_sigkill_during_saves_never_leaves_a_truncated_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    rng = random.Random(0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        while not path.exists():
            time.sleep(0.01)
        time.sleep(rng.uniform(0.05, 0.3))
        while not stale_temp_files(tmp_path):  # kill in the middle of a write
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert stale_temp_files(tmp_path)  # the half-written temporary file is there ...
    checkpoint = torch.load(path, weights_only=True)  # ... and last.ckpt is complete
    assert torch.equal(checkpoint["w"], torch.full((2_000_000,), float(checkpoint["i"])))
    assert remove_stale_temp_files(tmp_path) and not stale_temp_files(tmp_path)


class _Linear(L.LightningModule):
    """A minimal real LightningModule for trainer-level checks of callbacks and plugins."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x = batch[0]
        loss = self.layer(x).pow(2).mean()
        self.log("train/loss", loss, on_step=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(64, 4))
        return ResumableDataLoader(data, batch_size=4, seed=0)


def _trainer(tmp_path, callbacks, **kwargs) -> L.Trainer:
    defaults = {
        "accelerator": "cpu",
        "max_steps": 6,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "plugins": [AtomicCheckpointIO()],
        "default_root_dir": tmp_path,
    }
    return L.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def test_trainer_checkpoint_io_turns_disk_full_into_a_clear_error(tmp_path, monkeypatch):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True, every_n_train_steps=2, save_top_k=-1)
    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, f, *args, **kwargs):  # the 3rd file written (step 4) hits a full disk
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(CheckpointWriteError, match=r"step=4.*No space left on device.*the disk is full"):
        _trainer(tmp_path, [ckpt]).fit(_Linear())
    assert torch.load(tmp_path / "ckpts/last.ckpt", weights_only=True)["global_step"] == 2
    assert not stale_temp_files(tmp_path / "ckpts")


# ------------------------------------------------------------------------------------ what to resume
def _train_cfg(tmp_path: Path, *overrides: str):
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


def _lightning_checkpoint(step: int, kind: str = "ldm", run_id: str | None = None) -> dict:
    return {
        "state_dict": {"w": torch.zeros(2)},
        "global_step": step,
        "optimizer_states": [{}],
        "loops": {},
        "callbacks": {TrainingState.__qualname__: {"mlflow_run_id": run_id}},
        "segldm": {"kind": kind, "config": None},
    }


def test_explicit_truncated_checkpoint_is_refused_before_anything_is_built(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_save(_lightning_checkpoint(4), path)
    path.write_bytes(path.read_bytes()[:-100])  # truncated copy, e.g. an interrupted scp
    with pytest.raises(
        CheckpointError, match=f"ckpt_path checkpoint {path} is not a readable.*truncated or corrupt"
    ):
        plan_resume(_train_cfg(tmp_path, f"ckpt_path={path}"))


def test_explicit_checkpoint_must_hold_training_state_of_the_same_model(tmp_path):
    weights = tmp_path / "weights.ckpt"
    atomic_save({"state_dict": {"w": torch.zeros(2)}}, weights)
    with pytest.raises(CheckpointError, match=f"init_from={weights}"):
        plan_resume(_train_cfg(tmp_path, f"ckpt_path={weights}"))
    other = tmp_path / "ae.ckpt"
    atomic_save(_lightning_checkpoint(4, kind="autoencoder"), other)
    with pytest.raises(CheckpointError, match="'autoencoder' checkpoint but this run trains a 'ldm' model"):
        plan_resume(_train_cfg(tmp_path, f"ckpt_path={other}"))
    good = tmp_path / "good.ckpt"
    atomic_save(_lightning_checkpoint(4, run_id="abc"), good)
    plan = plan_resume(_train_cfg(tmp_path, f"ckpt_path={good}"))
    assert (plan.ckpt_path, plan.mlflow_run_id, plan.global_step) == (str(good), "abc", 4)


@pytest.mark.parametrize("mode", ["resume=auto", "ckpt_path=last"])
def test_auto_resume_takes_the_newest_readable_checkpoint(tmp_path, mode):
    ckpts = tmp_path / "run/checkpoints"
    for step in (2, 4):
        atomic_save(_lightning_checkpoint(step, run_id="run-1"), ckpts / f"step{step:07d}.ckpt")
        time.sleep(0.01)
    atomic_save(_lightning_checkpoint(6), ckpts / "last.ckpt")
    (ckpts / "last.ckpt").write_bytes(b"PK garbage")  # newest, but corrupt
    (ckpts / ".last.ckpt.x1y2.tmp").write_bytes(b"half")  # a write killed half-way
    with pytest.warns(UserWarning, match="skipping .*last.ckpt"):
        plan = plan_resume(_train_cfg(tmp_path, mode))
    assert plan.ckpt_path == str(ckpts / "step0000004.ckpt") and plan.global_step == 4
    assert plan.mlflow_run_id == "run-1"
    assert not stale_temp_files(ckpts)


def test_auto_resume_without_checkpoint_starts_fresh_but_keeps_the_mlflow_run(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run/mlflow_run.json").write_text('{"run_id": "r0", "tracking_uri": "sqlite:///x"}')
    plan = plan_resume(_train_cfg(tmp_path, "resume=auto"))
    assert plan.ckpt_path is None and plan.mlflow_run_id == "r0" and "no checkpoint" in plan.reason


def test_run_folder_of_the_same_command(tmp_path):
    assert run_dir(str(tmp_path), "2026-01-01_00-00-00") == f"{tmp_path}/2026-01-01_00-00-00"
    assert run_dir(str(tmp_path), "T", "auto", None, "exp-1") == f"{tmp_path}/exp-1"
    assert run_dir(str(tmp_path), "T", None, "last", "exp-1") == f"{tmp_path}/exp-1"
    with pytest.raises(ValueError, match="plain name"):
        run_dir(str(tmp_path), "T", "auto", None, "a/b")
    for name, overrides in [
        ("old", ["trainer.max_steps=4"]),
        ("mine", ["trainer.max_steps=8", "resume=auto"]),
    ]:
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra/overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    found = matching_run_folder(tmp_path, ["resume=auto", "trainer.max_steps=8", "hydra.run.dir=x"])
    assert found == tmp_path / "mine"
    assert matching_run_folder(tmp_path, ["trainer.max_steps=9"]) is None
    assert comparable_overrides(["ckpt_path=last", "+a=1", "hydra.job.chdir=true", "resume=auto"]) == ["+a=1"]


# ------------------------------------------------------------------------------------ data order, RNG
def _drain(loader, n=None):
    it = iter(loader)
    return [b[0].tolist() for _, b in zip(range(n if n is not None else len(loader)), it, strict=False)]


class _Augmented(AugmentationRandomState, torch.utils.data.Dataset):
    """Index plus a random-crop-like draw from Python's ``random`` (what folder/SFLCKR data use)."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([float(index), random.random()], dtype=torch.float64)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop", [3, 8])  # mid-epoch, and at the end of the epoch
def test_loader_resumes_mid_epoch_with_the_same_order_and_augmentation_draws(stop, workers):
    def loader() -> ResumableDataLoader:
        return ResumableDataLoader(_Augmented(), batch_size=4, seed=5, drop_last=True, num_workers=workers)

    def drain(it, n: int) -> list[list[float]]:
        return [next(it).flatten().tolist() for _ in range(n)]

    random.seed(7)  # without workers the draws come from this process's generator (seed_everything's)
    reference = loader()
    reference.sampler.set_epoch(1)
    epoch1 = drain(iter(reference), 8)
    reference.sampler.set_epoch(2)
    epoch2 = drain(iter(reference), 8)
    assert sorted(int(v) for batch in epoch1 for v in batch[::2]) == list(range(32)) and epoch1 != epoch2

    random.seed(7)
    killed = loader()
    killed.sampler.set_epoch(1)
    it = iter(killed)
    seen = drain(it, stop)
    state = killed.state_dict()
    del it, killed  # the killed run's workers go away with it

    random.seed(123)  # a new process: whatever it had is replaced by the saved state
    resumed = loader()
    resumed.load_state_dict(state)  # the epoch comes back with the state: Lightning iterates before set_epoch
    rest = [b.flatten().tolist() for b in resumed]
    assert seen + rest == epoch1  # same samples, same order, same random draws
    resumed.sampler.set_epoch(2)
    assert [b.flatten().tolist() for b in resumed] == epoch2  # and the next epoch is the reference's


def test_loader_iteration_leaves_the_global_random_state_alone():
    data = torch.utils.data.TensorDataset(torch.arange(8))
    module = SegmentationDataModule(
        SyntheticScenes(32, 4), SyntheticScenes(32, 2), size=32, n_labels=8, seed=3
    )
    torch.manual_seed(0)
    before = torch.get_rng_state()
    list(ResumableDataLoader(data, batch_size=2, seed=1))
    next(iter(module.val_dataloader()))
    assert torch.equal(torch.get_rng_state(), before)


def test_random_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = capture_rng()
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    atomic_save(state, tmp_path / "rng.ckpt")
    restore_rng(torch.load(tmp_path / "rng.ckpt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


# ------------------------------------------------------------------------------------ MLflow
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One SQLite store for the module: creating one runs MLflow's migrations (seconds)."""
    root = tmp_path_factory.mktemp("mlflow")
    MlflowClient(f"sqlite:///{root}/mlflow.db").search_experiments()
    return root


def _logger(store: Path, **kwargs) -> ResilientMLFlowLogger:
    return ResilientMLFlowLogger(
        experiment_name="t",
        tracking_uri=f"sqlite:///{store}/mlflow.db",
        log_retries=3,
        retry_wait_s=0.0,
        **kwargs,
    )


def _fail_store(
    monkeypatch, logger, method: str, failures: int | None, error: Exception | None = None
) -> dict:
    """Make the real (cached, shared) store behind the client raise on its next ``failures`` calls (None: always)."""
    store = logger.client._client._tracking_client.store
    original = getattr(store, method)
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if failures is None or calls["n"] <= failures:
            raise error or ConnectionError("tracking server restarting")
        return original(*args, **kwargs)

    monkeypatch.setattr(store, method, flaky)
    if method == "log_batch":  # MLflow's asynchronous queue holds the store's log_batch it was built with
        monkeypatch.setattr(store._async_logging_queue, "_logging_func", flaky)
    return calls


def test_failed_log_calls_are_retried(monkeypatch, store):
    logger = _logger(store)
    run_id = logger.run_id
    calls = _fail_store(monkeypatch, logger, "log_batch", failures=2)
    logger.log_metrics({"train/loss": 0.5}, step=7)  # queued; MLflow's thread's try fails
    assert logger.flush() == 0  # waits for it, sends it again synchronously: fails once more, then arrives
    assert calls["n"] == 3
    history = MlflowClient(f"sqlite:///{store}/mlflow.db").get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(7, 0.5)]


def test_metrics_are_logged_off_the_training_thread_and_flushed_with_a_bound(monkeypatch, store):
    """log_metrics returns while the store has not answered; flush waits for it, at most
    flush_timeout_s, and keeps what is still queued for the next flush."""
    logger = _logger(store, flush_timeout_s=0.2)
    run_id = logger.run_id
    queue = logger.client._client._tracking_client.store._async_logging_queue
    original, gate = queue._logging_func, threading.Event()

    def slow_store(*args, **kwargs):
        assert gate.wait(60), "log_metrics waited for the store: logging is not asynchronous"
        return original(*args, **kwargs)

    monkeypatch.setattr(queue, "_logging_func", slow_store)
    logger.log_metrics({"train/loss": 0.25}, step=3)  # returns although the store is blocked
    assert len(logger.client.pending) == 1
    with pytest.warns(TrackingWarning, match=r"1 logging batch\(es\) queued after 0 s"):
        assert logger.flush() == 1
    gate.set()
    logger.flush_timeout_s = 60.0
    assert logger.flush() == 0 and not logger.client.pending
    history = MlflowClient(f"sqlite:///{store}/mlflow.db").get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(3, 0.25)]


def test_a_tracking_outage_drops_log_calls_with_a_warning_and_training_finishes(monkeypatch, store, tmp_path):
    logger = _logger(store)
    run_id = logger.run_id
    calls = _fail_store(monkeypatch, logger, "log_batch", failures=None)
    with pytest.warns(
        TrackingWarning, match=r"log_batch failed (after 3 tries|again \(still unavailable\)) and was dropped"
    ):
        _trainer(tmp_path, [], logger=logger, log_every_n_steps=1).fit(_Linear())
    # 6 steps queued, failing in MLflow's thread (which may merge queued batches into fewer calls);
    # at the end the flush sends each again: the first with 3 tries, then (still down) one try each
    assert calls["n"] - (3 + 5) in range(0, 7)
    assert len(logger.client.dropped) == 6  # none arrived; the run's status is still set at the end
    assert MlflowClient(f"sqlite:///{store}/mlflow.db").get_run(run_id).info.status == "FINISHED"


def test_permanent_errors_are_not_retried_and_setup_errors_still_raise(monkeypatch, store):
    logger = _logger(store)
    _ = logger.run_id
    bad = MlflowException("Changing param values is not allowed", error_code=INVALID_PARAMETER_VALUE)
    calls = _fail_store(monkeypatch, logger, "log_batch", failures=None, error=bad)
    logger.log_hyperparams({"a": 1})  # queued: refused in MLflow's thread
    with pytest.warns(TrackingWarning, match="log_batch failed and was dropped"):
        logger.flush()
    assert calls["n"] == 2  # the background try, then one synchronous try that sees the error is permanent
    client = RetryingClient(MlflowClient(f"sqlite:///{store}/mlflow.db"), retries=2, wait_s=0.0)
    with pytest.raises(MlflowException):
        client.get_run("no-such-run")


def test_continued_run_is_reopened_and_changed_params_become_a_tag(store):
    first = _logger(store)
    first.log_hyperparams({"lr": 0.1, "steps": 4})
    first.finalize("failed")
    run_id = first.run_id
    resumed = _logger(store, run_id=run_id)
    resumed.log_hyperparams({"lr": 0.1, "steps": 8, "new": "x"})
    resumed.flush()
    run = MlflowClient(f"sqlite:///{store}/mlflow.db").get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.data.params == {"lr": "0.1", "steps": "4", "new": "x"}
    assert run.data.tags["segldm.runtime.resume.changed_params"] == "steps: 4 -> 8"
    resumed.mark_preempted("SIGTERM", 8, "last.ckpt")
    resumed.finalize("failed")
    assert MlflowClient(f"sqlite:///{store}/mlflow.db").get_run(run_id).info.status == "KILLED"


def test_unreachable_server_fails_naming_it_or_falls_back_to_the_local_store(store):
    server = "logger.mlflow.tracking_uri=http://127.0.0.1:9"
    with pytest.raises(
        TrackingUnavailableError, match=r"http://127.0.0.1:9 is unreachable.*on_unavailable=local"
    ):
        build_loggers(_train_cfg(store, server))
    with pytest.warns(UserWarning, match="on_unavailable=local: tracking to sqlite:///"):
        (logger,) = build_loggers(_train_cfg(store, server, "logger.mlflow.on_unavailable=local"))
    assert isinstance(logger, ResilientMLFlowLogger)
    assert logger._tracking_uri == f"sqlite:///{store}/mlflow.db"
    assert MlflowClient(logger._tracking_uri).get_run(logger.run_id).info.status == "RUNNING"


# ------------------------------------------------------------------------------------ gradients, signals
def _tiny_ldm():
    cfg = _train_cfg(Path("/tmp/unused"))
    return instantiate(cfg.model, optimization={"base_learning_rate": 1e-4})


def test_nonfinite_gradient_stops_naming_step_batch_and_parameter(tmp_path):
    model = _tiny_ldm()
    weight = model.model.diffusion_model.out[2].weight

    class PoisonAtStep3(L.Callback):  # a finite loss whose backward produces NaN in one parameter
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                weight.register_hook(lambda g: g * float("nan"))

    data = SegmentationDataModule(
        SyntheticScenes(32, 16), SyntheticScenes(32, 2), size=32, n_labels=8, batch_size=2
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1, save_top_k=-1)
    trainer = _trainer(tmp_path, [PoisonAtStep3(), FiniteGradients(), ckpt], max_steps=6, limit_val_batches=0)
    with pytest.raises(
        FloatingPointError, match=r"global step 3, batch 3 .*model.diffusion_model.out.2.weight"
    ):
        trainer.fit(model, datamodule=data)
    last = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_nonfinite_gradients_lists_only_the_bad_parameters():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    a.grad, b.grad = torch.tensor([1e30, 1.0]), torch.tensor([1.0, float("inf")])
    assert nonfinite_gradients([("a", a), ("b", b)]) == ["b"]
    b.grad = torch.ones(2)
    assert nonfinite_gradients([("a", a), ("b", b)]) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_writes_last_checkpoint_at_the_step_boundary_and_exits(tmp_path, sig):
    class SignalAtStep3(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                os.kill(os.getpid(), sig)  # delivered now, in the middle of the step

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True, every_n_train_steps=100)
    preemption = PreemptionCheckpoint(["SIGTERM", "SIGUSR1"])
    previous = signal.getsignal(sig)
    with pytest.raises(Preempted) as exit_info:
        _trainer(tmp_path, [SignalAtStep3(), preemption, ckpt]).fit(_Linear())
    assert exit_info.value.code == 128 + sig
    saved = torch.load(tmp_path / "ckpts/last.ckpt", weights_only=True)
    assert saved["global_step"] == 4  # the step that was running finished first
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["loader"]["_num_yielded"] == 4
    assert signal.getsignal(sig) == previous  # handlers restored


def test_signal_names_are_checked():
    assert parse_signals(["TERM", "SIGUSR1", 12]) == [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2]
    with pytest.raises(ValueError, match="'SIGFOO' is not a signal"):
        parse_signals(["SIGFOO"])
    with pytest.raises(ValueError, match="cannot be caught"):
        parse_signals(["SIGKILL"])


# ------------------------------------------------------------------------------------ start-up checks
def _checked(tmp_path, *overrides):
    fs = tmp_path / "fs.ckpt"
    fs.write_bytes(b"x")
    return compose_train(
        [
            f"paths.output_root={tmp_path}/out",
            f"paths.output_dir={tmp_path}/out/run",
            f"model.first_stage.ckpt_path={fs}",
            *overrides,
        ]
    )


def test_seed_attention_quirk_stays_valid(tmp_path):
    validate_config(_checked(tmp_path))  # [32, 16, 8] with channel_mult [1, 4, 8]: middle block only


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (
            ["model.unet.attention_resolutions=[3]"],
            ["attention_resolutions=[3]", "[3] can never match", "[1, 2, 4]"],
        ),
        (["model.unet.attention_resolutions=[0,2]"], ["[0] can never match"]),
        (["+data.val_batch_size=0"], ["data.val_batch_size=0 must be positive"]),
        (["resume=always"], ["resume='always' is not a resume mode", "resume=auto"]),
        (["resume=auto", "ckpt_path=/x.ckpt"], ["resume=auto and ckpt_path=/x.ckpt are both set"]),
        (["reliability.checkpoint_signals=[SIGTERM,SIGBOGUS]"], ["'SIGBOGUS' is not a signal"]),
        (["logger.mlflow.on_unavailable=retry"], ["logger.mlflow.on_unavailable='retry'", "fail or local"]),
    ],
)
def test_more_mismatches_fail_at_start(tmp_path, overrides, fragments):
    with pytest.raises(ConfigError) as err:
        validate_config(_checked(tmp_path, *overrides))
    for fragment in fragments:
        assert fragment in str(err.value)


def test_unwritable_output_and_checkpoint_folders_fail_at_start(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(
        ConfigError, match=re.escape(f"paths.output_dir={blocker}/run cannot be written ({blocker} is a file")
    ):
        validate_config(_checked(tmp_path, f"paths.output_dir={blocker}/run"))
    with pytest.raises(
        ConfigError, match="callbacks.model_checkpoint.dirpath=.*a_file/ckpts cannot be written"
    ):
        validate_config(_checked(tmp_path, f"callbacks.model_checkpoint.dirpath={blocker}/ckpts"))


def test_little_free_space_warns_at_start(tmp_path):
    with pytest.warns(ConfigWarning, match=r"GiB free on the disk of .*\(reliability.min_free_gb="):
        validate_config(_checked(tmp_path, "reliability.min_free_gb=1e9"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        validate_config(_checked(tmp_path, "reliability.min_free_gb=0"))


@pytest.mark.parametrize(
    ("owner", "name"),
    [
        (lightning_loops.training_epoch_loop._TrainingEpochLoop, "_should_check_val_fx"),
        (L.Trainer, "_results"),
    ],
)
def test_a_lightning_without_the_internals_exact_resume_reads_fails_at_start_up(monkeypatch, owner, name):
    """Exact resume reads private Lightning state; a release that renamed it must stop before training."""
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    check_lightning_internals(trainer)  # the pinned Lightning has them all
    monkeypatch.delattr(owner, name)
    with pytest.raises(
        RuntimeError, match=rf"lightning .* lacks trainer\S*\.{name}, which segldm's exact resume"
    ):
        check_lightning_internals(trainer)


def test_a_lightning_without_an_instance_attribute_exact_resume_reads_fails_at_start_up():
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    del trainer.fit_loop.epoch_loop._batches_that_stepped
    with pytest.raises(RuntimeError, match=r"lacks trainer.fit_loop.epoch_loop._batches_that_stepped"):
        check_lightning_internals(trainer)


def test_progress_log_line_names_step_rate_eta_and_metrics():
    from types import SimpleNamespace

    from segldm.training.callbacks import ProgressLog

    callback = ProgressLog(every_n_seconds=30)
    callback._started, callback._first_step = 100.0, 0
    trainer = SimpleNamespace(
        global_step=50, max_steps=200, progress_bar_metrics={"train/loss": 0.25, "v_num": "x"}
    )
    line = callback.line(trainer, now=125.0)
    assert line == "step 50/200 (25%) | 0.50 s/step | ETA 1m15s | train/loss 0.2500"
