"""Killed runs resume exactly: real `python -m segldm.train` subprocesses killed mid-epoch (issue 7).

A reference run trains 12 steps uninterrupted (8 batches per epoch, so the resume crosses an
epoch boundary). Another run of the same command with `resume=auto` is killed after a checkpoint
exists and started again; its final checkpoint (weights, EMA, optimizer, scheduler, loop and data
position) must equal the reference's bit for bit, and its single MLflow run must hold, at every
step, exactly the reference's values. As a run that ignored its checkpoint and trained again from
step 0 would end the same, the restarted process must also show that it continued from the
checkpoint it names: the first step it trains and logs is the checkpoint's (tests/resume_helpers.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, TINY_DATA, TINY_FIRST_STAGE, TINY_TRAINER, TINY_UNET, run_train
from tests.resume_helpers import (
    assert_process_resumed_from,
    load_checkpoints,
    now_ms,
    planned_resume,
)
from tests.unit.test_data_folder import blocky_labels, write_pair

MAX_STEPS = 12
ARGS = [
    "model=ldm_seg",
    *TINY_FIRST_STAGE,
    *TINY_UNET,
    *TINY_DATA,
    *TINY_TRAINER,
    "model.first_stage.ckpt_path=null",  # a random frozen first stage: enough to compare two runs
    "model.require_pretrained_first_stage=false",
    "model.optimization.base_learning_rate=1e-4",
    "scheduler.warm_up_steps=[4]",
    f"trainer.max_steps={MAX_STEPS}",
    "trainer.deterministic=true",
]


def start_train(args: list[str], root: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m segldm.train` in the background (as tests.conftest.run_train, but killable)."""
    env = {**os.environ, "SEGLDM_ROOT": str(root), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "segldm.train", *args],
        cwd=REPO,
        env={**env, **(extra_env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def train(args: list[str], root: Path, extra_env: dict[str, str] | None = None) -> str:
    """Run to the end (same environment as the killed runs: equal thread counts give equal floats)."""
    proc = start_train(args, root, extra_env)
    output = proc.communicate(timeout=600)[0]
    if proc.returncode != 0:
        pytest.fail(f"segldm.train {' '.join(args)} failed ({proc.returncode}):\n{output[-6000:]}")
    return output


def signal_when(proc: subprocess.Popen, path: Path, sig: int, timeout: float = 240) -> str:
    """Send ``sig`` as soon as ``path`` exists; return the process output once it exited."""
    deadline = time.monotonic() + timeout
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    if proc.poll() is not None:
        pytest.fail(f"the run ended before {path} appeared:\n{proc.communicate()[0][-4000:]}")
    proc.send_signal(sig)
    return proc.communicate(timeout=timeout)[0]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training_state(resumed: dict, reference: dict) -> None:
    """Weights/EMA/buffers, optimizer moments, LR scheduler, data position: bit-identical."""
    assert resumed["global_step"] == reference["global_step"] == MAX_STEPS
    assert resumed["state_dict"].keys() == reference["state_dict"].keys()
    different = [
        k for k, v in reference["state_dict"].items() if not torch.equal(v, resumed["state_dict"][k])
    ]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"
    assert len(resumed["optimizer_states"]) == len(reference["optimizer_states"])
    for ref_optimizer, res_optimizer in zip(
        reference["optimizer_states"], resumed["optimizer_states"], strict=True
    ):  # the taming first stage has two (autoencoder, discriminator)
        for ref_state, res_state in zip(
            ref_optimizer["state"].values(), res_optimizer["state"].values(), strict=True
        ):
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(ref_state[key], res_state[key]), key
    assert resumed["lr_schedulers"] == reference["lr_schedulers"]
    loader = "combined_loader"
    fit_loop = "fit_loop"
    assert (
        resumed["loops"][fit_loop]["state_dict"][loader] == reference["loops"][fit_loop]["state_dict"][loader]
    )


def metric_history(client: MlflowClient, run_id: str) -> dict[str, dict[int, set[float]]]:
    """{metric: {step: every value recorded at that step}}."""
    history: dict[str, dict[int, set[float]]] = {}
    for key in client.get_run(run_id).data.metrics:
        for m in client.get_metric_history(run_id, key):
            history.setdefault(key, {}).setdefault(m.step, set()).add(m.value)
    return history


def single_run(client: MlflowClient, run_name: str):
    experiment = client.get_experiment_by_name("segldm")
    runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{run_name}'")
    assert len(runs) == 1, (
        f"{len(runs)} MLflow runs named {run_name}: the resumed run must continue the first"
    )
    return runs[0]


def resume(command: list[str], root: Path, folder: Path, run_name: str, loss_key: str = "train/loss") -> str:
    """Start the interrupted command again, to the end: the process must continue from the checkpoint
    it names (its first trained and logged step is that checkpoint's), not train again from step 0."""
    checkpoints = load_checkpoints(folder)  # before the resumed run overwrites last.ckpt
    started = now_ms()
    output = train(command, root)
    path, step = planned_resume(output)
    assert path in checkpoints and checkpoints[path]["global_step"] == step, (path, step, sorted(checkpoints))
    client = MlflowClient(f"sqlite:///{root}/outputs/mlflow.db")
    run_id = single_run(client, run_name).info.run_id
    assert_process_resumed_from(
        client, run_id, checkpoints[path], started, last_step=MAX_STEPS - 1, loss_key=loss_key
    )
    return output


def assert_same_metrics(
    client: MlflowClient, run_name: str, reference_id: str, loss_key: str = "train/loss"
) -> None:
    run = single_run(client, run_name)
    assert run.info.status == "FINISHED"
    reference, resumed = metric_history(client, reference_id), metric_history(client, run.info.run_id)
    assert sorted(resumed) == sorted(reference)
    assert sorted(reference[loss_key]) == list(range(MAX_STEPS))
    for key, steps in reference.items():
        assert resumed[key] == steps, key  # every step present, every recorded value the reference's


def test_the_resume_check_fails_a_run_that_restarted_from_step_0(tmp_path):
    """What resume() checks, on a store written by hand: a process that ignored its checkpoint of step
    6 and trained again from step 0 logs the reference's values at every step, as the resumed one
    does; only its own entries (logged after it started) show it, and the check fails it."""
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment_id = client.create_experiment("segldm", artifact_location=str(tmp_path / "artifacts"))
    checkpoint = {  # written after step 6; Lightning had not sent step 5's metrics yet
        "global_step": 6,
        "callbacks": {"TrainingState": {"unlogged_metrics": {"step": 5, "metrics": {"train/loss": 0.5}}}},
    }

    def run_of(second_process: range, extra: tuple[str, int] | None = None) -> str:
        run_id = client.create_run(experiment_id).info.run_id
        first = [Metric("train/loss", 1.0 / (s + 1), 1_000 + s, s) for s in range(5)]  # killed after 6
        second = [Metric("train/loss", 1.0 / (s + 1), 2_000 + s, s) for s in second_process]
        if extra:
            second.append(Metric(extra[0], 0.0, 2_100, extra[1]))
        client.log_batch(run_id, metrics=first + second)
        return run_id

    resumed = run_of(range(5, MAX_STEPS))  # step 5 from the checkpoint, then 6..11 trained
    assert_process_resumed_from(client, resumed, checkpoint, since_ms=2_000, last_step=MAX_STEPS - 1)
    restarted = run_of(range(MAX_STEPS))
    with pytest.raises(
        AssertionError, match="trained step 0 first, but it was resumed from the checkpoint of step 6"
    ):
        assert_process_resumed_from(client, restarted, checkpoint, since_ms=2_000)
    early = run_of(range(5, MAX_STEPS), extra=("val/loss", 3))
    with pytest.raises(AssertionError, match=r"logged steps before it: \['val/loss@3'\]"):
        assert_process_resumed_from(client, early, checkpoint, since_ms=2_000)
    skipped = run_of(range(7, MAX_STEPS))
    with pytest.raises(AssertionError, match="trained step 7 first"):
        assert_process_resumed_from(client, skipped, checkpoint, since_ms=2_000)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run; tests resume their own runs in the same root (one MLflow store)."""
    root = tmp_path_factory.mktemp("resume")
    train([*ARGS, "hydra.run.dir=${paths.output_root}/reference", "run_name=reference"], root)
    client = MlflowClient(f"sqlite:///{root}/outputs/mlflow.db")
    return (
        root,
        load(root / "outputs/reference/checkpoints/last.ckpt"),
        single_run(client, "reference").info.run_id,
    )


def test_sigkill_mid_epoch_then_resume_equals_the_uninterrupted_run(reference):
    root, final, reference_id = reference
    command = [*ARGS, "run_name=killed", "resume=auto"]  # the folder is outputs/runs/train/killed
    folder = root / "outputs/runs/train/killed"
    proc = start_train(command, root)
    output = signal_when(proc, folder / "checkpoints/step0000006.ckpt", signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, output[-3000:]
    complete = [load(p)["global_step"] for p in (folder / "checkpoints").glob("*.ckpt")]
    assert 6 <= max(complete) < 8, "the kill must land mid-epoch, before the run finished"

    resumed = resume(command, root, folder, "killed")
    assert f"resumed from:    {folder}/checkpoints/" in resumed
    assert_same_training_state(load(folder / "checkpoints/last.ckpt"), final)
    assert_same_metrics(MlflowClient(f"sqlite:///{root}/outputs/mlflow.db"), "killed", reference_id)
    assert not list((folder / "checkpoints").glob(".*.tmp"))


def write_folder_data(root: Path) -> None:
    """32 train and 4 val pairs at 40 x 48 px: random 32 px crops and flips have room to differ."""
    for split, n in (("train", 32), ("val", 4)):
        for i in range(n):
            labels = blocky_labels(40, 48, 8, seed=i + (100 if split == "val" else 0))
            write_pair(root, f"{split}/img{i}", labels, mask_dir="masks")


@pytest.mark.slow  # fast tier under ~15 min on 2 cores (docs/tests.md)
def test_sigkill_with_two_workers_and_random_augmentations_resumes_exactly(tmp_path):
    """Folder data with random crops and flips read by two worker processes: killed mid-epoch and
    resumed, the run ends bit-identical to the uninterrupted one (the loader's state holds each
    worker's augmentation random state, not only the sample order)."""
    write_folder_data(tmp_path / "data")
    args = [
        *[a for a in ARGS if not a.startswith("data.")],
        "data=folder",
        f"data.root={tmp_path / 'data'}",
        "data.size=32",
        "data.n_labels=8",
        "data.ignore_label=null",
        "data.batch_size=4",
        "data.num_workers=2",
        "data.persistent_workers=false",
        "data.pin_memory=false",
    ]
    train([*args, "hydra.run.dir=${paths.output_root}/reference", "run_name=reference"], tmp_path)
    final = load(tmp_path / "outputs/reference/checkpoints/last.ckpt")
    command = [*args, "run_name=killed", "resume=auto"]
    folder = tmp_path / "outputs/runs/train/killed"
    proc = start_train(command, tmp_path)
    output = signal_when(proc, folder / "checkpoints/step0000006.ckpt", signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, output[-3000:]
    resumed = resume(command, tmp_path, folder, "killed")
    assert f"resumed from:    {folder}/checkpoints/" in resumed
    assert_same_training_state(load(folder / "checkpoints/last.ckpt"), final)


GAN_ARGS = [
    "model=autoencoder",
    "model/loss=taming",
    *TINY_FIRST_STAGE,
    *TINY_DATA,
    *TINY_TRAINER,
    "model.loss.perceptual_weight=0",  # offline; LPIPS's own path is tested in test_first_stage_loss
    "model.loss.disc_ndf=8",
    "model.loss.disc_start=3",  # the GAN terms switch on mid-run, before the kill
    "model.optimization.base_learning_rate=1e-4",
    f"trainer.max_steps={MAX_STEPS}",
    "trainer.deterministic=true",
]


@pytest.mark.slow  # fast tier under ~15 min on 2 cores (docs/tests.md)
def test_two_optimizer_first_stage_resumes_exactly_after_sigkill(tmp_path):
    """The taming stage (autoencoder + discriminator optimizers, BatchNorm statistics, manual
    optimisation): killed mid-epoch and resumed, it ends where the uninterrupted run ends."""
    train([*GAN_ARGS, "hydra.run.dir=${paths.output_root}/gan_reference", "run_name=gan_reference"], tmp_path)
    final = load(tmp_path / "outputs/gan_reference/checkpoints/last.ckpt")
    assert (
        len(final["optimizer_states"]) == 2 and final["global_step"] == MAX_STEPS
    )  # steps = autoencoder steps
    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    reference_id = single_run(client, "gan_reference").info.run_id
    logged = set(client.get_run(reference_id).data.metrics)
    assert {
        "train/aeloss", "train/discloss", "train/nll_loss", "train/g_loss", "train/d_weight", "train/disc_factor",
        "train/quant_loss", "train/p_loss", "train/logits_real", "train/logits_fake", "val/rec_loss",
    } <= logged  # fmt: skip
    d_weights = {m.step: m.value for m in client.get_metric_history(reference_id, "train/d_weight")}
    factors = {m.step: m.value for m in client.get_metric_history(reference_id, "train/disc_factor")}
    assert factors[2] == 0.0 and factors[3] == 1.0 and d_weights[5] > 0

    command = [*GAN_ARGS, "run_name=gan_killed", "resume=auto"]
    folder = tmp_path / "outputs/runs/train/gan_killed"
    proc = start_train(command, tmp_path)
    output = signal_when(proc, folder / "checkpoints/step0000006.ckpt", signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, output[-3000:]
    resume(command, tmp_path, folder, "gan_killed", loss_key="train/aeloss")
    assert_same_training_state(load(folder / "checkpoints/last.ckpt"), final)
    assert_same_metrics(client, "gan_killed", reference_id, loss_key="train/aeloss")


@pytest.mark.slow
def test_sigterm_checkpoints_at_the_step_boundary_and_resumes_exactly(reference):
    root, final, reference_id = reference
    command = [*ARGS, "run_name=terminated", "resume=auto"]
    folder = root / "outputs/runs/train/terminated"
    proc = start_train(command, root)
    output = signal_when(proc, folder / "checkpoints/step0000004.ckpt", signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "received SIGTERM: wrote" in output and "resume=auto" in output
    step = load(folder / "checkpoints/last.ckpt")["global_step"]
    assert 4 <= step < MAX_STEPS
    client = MlflowClient(f"sqlite:///{root}/outputs/mlflow.db")
    assert single_run(client, "terminated").info.status == "KILLED"

    resume(command, root, folder, "terminated")
    assert_same_training_state(load(folder / "checkpoints/last.ckpt"), final)
    assert_same_metrics(client, "terminated", reference_id)


@pytest.mark.slow
def test_sigusr1_under_slurm_saves_and_requeues_then_resumes_exactly(reference, tmp_path):
    """Lightning's SLURM auto-requeue after our step-boundary checkpoint; `scontrol` is a recording stub."""
    root, final, reference_id = reference
    (tmp_path / "scontrol").write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n')
    (tmp_path / "scontrol").chmod(0o755)
    slurm = {
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "segldm",
        "SLURM_JOB_ID": "4242",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "PATH": f"{tmp_path}:{os.environ['PATH']}",
        "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
    }
    command = [*ARGS, "run_name=requeued", "resume=auto"]
    folder = root / "outputs/runs/train/requeued"
    proc = start_train(command, root, slurm)
    output = signal_when(proc, folder / "checkpoints/step0000004.ckpt", signal.SIGUSR1)
    assert proc.returncode == 128 + signal.SIGUSR1, output[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert list(folder.glob("hpc_ckpt_*.ckpt")) and (folder / "checkpoints/last.ckpt").is_file()

    resume(command, root, folder, "requeued")  # the requeued job: same command
    assert_same_training_state(load(folder / "checkpoints/last.ckpt"), final)
    assert_same_metrics(MlflowClient(f"sqlite:///{root}/outputs/mlflow.db"), "requeued", reference_id)


@pytest.mark.slow
def test_corrupt_ckpt_path_is_refused_before_training(tmp_path):
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"PK\x03\x04 this is not a whole checkpoint")
    proc = run_train(
        [*ARGS, f"ckpt_path={bad}", "hydra.run.dir=${paths.output_root}/bad"], tmp_path, check=False
    )
    assert proc.returncode != 0
    assert (
        f"ckpt_path checkpoint {bad} is not a readable torch checkpoint (truncated or corrupt?)"
        in proc.stderr
    )
    assert not (tmp_path / "outputs/bad/checkpoints").exists()


@pytest.mark.slow
def test_unreachable_server_with_local_fallback_trains(tmp_path):
    args = [
        *ARGS,
        "trainer.max_steps=2",
        "logger.mlflow.tracking_uri=http://127.0.0.1:9",
        "logger.mlflow.on_unavailable=local",
        "run_name=fallback",
        "hydra.run.dir=${paths.output_root}/fallback",
    ]
    proc = run_train(args, tmp_path)
    assert "http://127.0.0.1:9 is unreachable" in proc.stdout + proc.stderr
    run = single_run(MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db"), "fallback")
    assert run.info.status == "FINISHED" and [
        m.step
        for m in MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db").get_metric_history(
            run.info.run_id, "train/loss"
        )
    ] == [0, 1]


@pytest.mark.slow
def test_fault_injection_script(tmp_path):
    """experiments/faults/run_faults.py with 3 random kills: the final checkpoint equals the reference,
    and every restarted process continued from the checkpoint it names."""
    out = tmp_path / "faults.json"
    proc = subprocess.run(
        [
            sys.executable,
            "experiments/faults/run_faults.py",
            "--kills",
            "3",
            "--seed",
            "1",
            "--root",
            str(tmp_path / "root"),
            "--json",
            str(out),
            "--no-results-md",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.is_file(), proc.stdout[-4000:] + proc.stderr[-4000:]
    import json

    result = json.loads(out.read_text())
    assert result["identical"] and result["kills"] == 3 and result["metrics_identical"]
    # and each restarted process continued from its checkpoint (a restart from 0 ends identical too)
    assert result["final_resumed_from_step"] > 0
    assert result["final_first_step_trained"] == result["final_resumed_from_step"], result["attempts"]
    assert result["every_process_continued_from_its_checkpoint"], result["attempts"]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
