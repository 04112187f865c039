"""Sweeps end to end: a real 2x2 lr x warm-up multirun, resume, the SQLite store, SLURM scripts.

Every run goes through `python -m segldm.train -m ...` in a subprocess (tiny model, 4 optimizer
steps of 2 accumulated batches per job) and is read back from MLflow and the sweep folder here.
Fast tier: the sequential grid, its report and an interrupted-then-resumed sweep, the SLURM
script. Slow tier: the same grid on 2 parallel joblib workers on a fresh store, 4 concurrent
SQLite writers, resume by sweep id into a new folder, the report CLI, an Optuna search.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from PIL import Image

from segldm.sweeps.jobs import SweepError, check_sweeper, job_key, prepare_tracking_store
from segldm.sweeps.markers import MARKER_NAME
from tests.conftest import CONF, TINY_DATA, TINY_FIRST_STAGE, TINY_TRAINER, TINY_UNET, run_train
from tests.integration.test_eval import TINY_SEGMENTER
from tests.integration.test_eval import run as run_module
from tests.unit.test_metrics_fid import make_random_inception

TINY_LDM = [
    *TINY_DATA,
    *TINY_FIRST_STAGE,
    *TINY_UNET,
    *TINY_TRAINER,
    "model.first_stage.ckpt_path=null",  # sweep mechanics do not need a trained first stage
    "model.require_pretrained_first_stage=false",
]
GRID = [
    "model.optimization.base_learning_rate=1e-4,1e-3",
    "scheduler.warm_up_steps=0,2",
    "trainer.accumulate_grad_batches=2",
]
SWEEP_DIR = "hydra.sweep.dir=${paths.output_root}/multiruns/grid"


def sweep_runs(root: Path, sweep_id: str) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/outputs/mlflow.db")
    experiment = client.get_experiment_by_name("segldm")
    return client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`segldm.sweep_id` = '{sweep_id}'", max_results=100
    )


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory):
    """The acceptance sweep: 2 learning rates x 2 warm-ups, one job after the other."""
    root = tmp_path_factory.mktemp("sweep")
    proc = run_train(["-m", *TINY_LDM, *GRID, SWEEP_DIR], root, timeout=400)
    return root, proc


def check_grid_runs(root: Path, sweep_id: str) -> None:
    runs = sweep_runs(root, sweep_id)
    assert len(runs) == 4
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["segldm.sweep_key"] for r in runs}) == 4
    assert sorted(r.data.tags["segldm.sweep_job"] for r in runs) == ["0", "1", "2", "3"]
    grid = {
        (r.data.params["model/optimization/base_learning_rate"], r.data.params["scheduler/warm_up_steps"])
        for r in runs
    }
    assert grid == {("0.0001", "0"), ("0.0001", "2"), ("0.001", "0"), ("0.001", "2")}
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/outputs/mlflow.db")
    for run in runs:
        overrides = json.loads(run.data.tags["segldm.sweep_overrides"])
        assert run.data.tags["segldm.sweep_key"] == job_key(overrides)
        lr = float(run.data.params["effective_learning_rate"])  # scale_lr: x batch 4 x accumulation 2
        assert lr == pytest.approx(float(run.data.params["model/optimization/base_learning_rate"]) * 4 * 2)
        first_lr = client.get_metric_history(run.info.run_id, "lr-AdamW")[0].value
        if run.data.params["scheduler/warm_up_steps"] == "0":  # no warm-up: full lr from step 0, no 0/0
            assert first_lr == pytest.approx(lr)
        else:  # LambdaLinear warm-up starts at f_start = 1e-6
            assert first_lr == pytest.approx(lr * 1e-6)
        job_dir = Path(run.data.tags["segldm.output_dir"])
        marker = json.loads((job_dir / MARKER_NAME).read_text())
        assert marker["status"] == "FINISHED" and marker["run_id"] == run.info.run_id
        assert marker["objective"] == pytest.approx(run.data.metrics["val/loss"])


def test_grid_sweep_is_four_tagged_finished_mlflow_runs(grid_sweep):
    root, _ = grid_sweep
    check_grid_runs(root, "multiruns/grid")


@pytest.mark.slow  # 4 jobs generating and scoring at each validation: ~70 s
def test_sweep_ranked_by_an_added_in_training_metric(tmp_path):
    """A 2x2 sweep whose objective is a metric added in one class (tests/toy_metric.py) plus a config
    entry: every job generates images for the validation masks at its validations
    (callbacks.generation_metrics: the toy, mIoU with a real trained segmenter, FID on a random
    Inception), returns val/redness to the sweeper, and the report ranks by it in the direction the
    class declares (higher is better; a name-based guess would have said lower)."""
    run_module(
        "segldm.train_segmenter",
        [*TINY_DATA, *TINY_SEGMENTER, "logger=none"],
        tmp_path,
    )
    segmenter = tmp_path / "outputs/segmenters/synthetic/segmenter.ckpt"
    inception = make_random_inception(tmp_path / "random_inception.pth")
    metrics_on = [
        "sweep.objective=val/redness",
        "+callbacks.generation_metrics.metrics.toy._target_=tests.toy_metric.Redness",
        "callbacks.generation_metrics.every_n_steps=2",
        "callbacks.generation_metrics.num_samples=4",
        "callbacks.generation_metrics.steps=4",
        "callbacks.generation_metrics.batch_size=4",
        f"callbacks.generation_metrics.metrics.segmentation.segmenter.ckpt={segmenter}",
        f"callbacks.generation_metrics.metrics.inception.weights_path={inception}",
        "callbacks.generation_metrics.metrics.inception.kid_subset_size=2",
    ]
    proc = run_train(["-m", *TINY_LDM, *GRID, *metrics_on, SWEEP_DIR], tmp_path, timeout=600)
    runs = sweep_runs(tmp_path, "multiruns/grid")
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/outputs/mlflow.db")
    finals = {}
    for run in runs:
        history = client.get_metric_history(run.info.run_id, "val/miou")
        val_loss = client.get_metric_history(run.info.run_id, "val/loss")
        # at both validations (after steps 2 and 4), logged at the same MLflow step as val/loss
        assert len(history) == 2 and {m.step for m in history} <= {m.step for m in val_loss}
        assert {"val/fid", "val/kid_mean", "val/pixel_accuracy", "val/redness"} <= set(run.data.metrics)
        assert len(client.get_metric_history(run.info.run_id, "val/redness")) == 2
        marker = json.loads((Path(run.data.tags["segldm.output_dir"]) / MARKER_NAME).read_text())
        assert marker["objective_name"] == "val/redness"
        assert marker["objective"] == pytest.approx(run.data.metrics["val/redness"])
        finals[run.data.tags["segldm.sweep_job"]] = run.data.metrics["val/redness"]
    assert len(set(finals.values())) > 1, "the jobs' values tie: the ranking below would prove nothing"
    manifest = json.loads((tmp_path / "outputs/multiruns/grid/sweep.json").read_text())
    assert manifest["objective"] == "val/redness" and manifest["direction"] == "maximize"
    rows = [
        r.split(",") for r in (tmp_path / "outputs/multiruns/grid/report/runs.csv").read_text().splitlines()
    ]
    assert rows[0][4] == "val/redness final"
    best = max(finals.values())
    starred = [row for row in rows[1:] if row[0].endswith("*")]
    assert len(starred) == 1 and float(starred[0][4]) == pytest.approx(best, rel=1e-3)  # 4 digits
    assert "val/redness final" in proc.stdout


@pytest.mark.slow
def test_parallel_sweep_with_joblib_on_a_fresh_store(tmp_path):
    """2 jobs at a time (joblib workers) writing to one new SQLite store: all 4 runs finish."""
    proc = run_train(
        ["-m", *TINY_LDM, *GRID, "hydra/launcher=local_parallel", SWEEP_DIR], tmp_path, timeout=400
    )
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    check_grid_runs(tmp_path, "multiruns/grid")
    assert (tmp_path / "outputs/multiruns/grid/report/heatmap.png").is_file()


def test_sweep_report_table_and_plots(grid_sweep):
    root, proc = grid_sweep
    report = root / "outputs/multiruns/grid/report"
    for name in ("heatmap.png", "curves.png"):
        with Image.open(report / name) as image:
            assert image.width > 300 and image.height > 200
    rows = (report / "runs.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert header[:4] == ["job", "status", "model.optimization.base_learning_rate", "scheduler.warm_up_steps"]
    assert len(rows) == 5 and all(",FINISHED," in row for row in rows[1:])
    assert "val/loss final" in proc.stdout and "(* = best final)" in proc.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/outputs/mlflow.db")
    experiment = client.get_experiment_by_name("segldm")
    (report_run,) = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`segldm.sweep_report` = 'multiruns/grid'"
    )
    logged = {a.path for a in client.list_artifacts(report_run.info.run_id, "report")}
    assert {"report/heatmap.png", "report/curves.png", "report/runs.md"} <= logged
    manifest = json.loads((root / "outputs/multiruns/grid/sweep.json").read_text())
    assert (
        manifest["sweep_id"] == "multiruns/grid"
        and "model.optimization.base_learning_rate=1e-4,1e-3" in manifest["command"]
    )


@pytest.mark.slow  # fast tier under ~15 min on 2 cores (docs/tests.md)
def test_interrupted_sweep_resumes_without_rerunning_finished_jobs(grid_sweep):
    root, _ = grid_sweep
    sweep_dir = root / "outputs/multiruns/grid"
    # job 3 "was killed": no marker, its MLflow run left FAILED
    (sweep_dir / "3" / MARKER_NAME).unlink()
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/outputs/mlflow.db")
    (killed,) = [r for r in sweep_runs(root, "multiruns/grid") if r.data.tags["segldm.sweep_job"] == "3"]
    client.set_terminated(killed.info.run_id, "FAILED")
    mtimes = {j: (sweep_dir / j / MARKER_NAME).stat().st_mtime_ns for j in "012"}

    proc = run_train(["-m", *TINY_LDM, *GRID, SWEEP_DIR], root)  # the same sweep, run again

    assert proc.stdout.count("already finished") == 3
    assert {j: (sweep_dir / j / MARKER_NAME).stat().st_mtime_ns for j in "012"} == mtimes
    runs = sweep_runs(root, "multiruns/grid")
    assert len(runs) == 5  # the 4 first ones + job 3 trained again
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == 4 and len({r.data.tags["segldm.sweep_key"] for r in finished}) == 4
    marker = json.loads((sweep_dir / "3" / MARKER_NAME).read_text())
    assert marker["status"] == "FINISHED" and marker["run_id"] not in {killed.info.run_id}
    rows = (sweep_dir / "report/runs.csv").read_text().splitlines()[1:]
    assert len(rows) == 4 and all(",FINISHED," in row for row in rows)


@pytest.mark.slow
def test_resume_by_sweep_id_in_a_new_folder_reads_mlflow(grid_sweep):
    root, _ = grid_sweep
    before = len(sweep_runs(root, "multiruns/grid"))
    again = "hydra.sweep.dir=${paths.output_root}/multiruns/grid_again"
    proc = run_train(["-m", *TINY_LDM, *GRID, "sweep.id=multiruns/grid", again], root)
    assert proc.stdout.count("already finished") == 4
    new_dir = root / "outputs/multiruns/grid_again"
    markers = [json.loads((new_dir / j / MARKER_NAME).read_text()) for j in "0123"]
    assert all(m["reused_from"].startswith(str(root / "outputs/multiruns/grid/")) for m in markers)
    assert not (new_dir / "0" / "checkpoints").exists()  # nothing was trained
    assert len(sweep_runs(root, "multiruns/grid")) == before  # no new run


@pytest.mark.slow
def test_report_cli_on_the_mlflow_experiment(grid_sweep, tmp_path):
    root, _ = grid_sweep
    n_runs = len(sweep_runs(root, "multiruns/grid"))
    env = {**os.environ, "SEGLDM_ROOT": str(root)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "segldm.report",
            "segldm",
            "--sweep-id",
            "multiruns/grid",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "heatmap.png").is_file() and (tmp_path / "curves.png").is_file()
    assert f"sweep multiruns/grid: {n_runs} runs" in proc.stdout  # every attempt, FAILED ones too
    missing = subprocess.run(
        [sys.executable, "-m", "segldm.report", "no-such-experiment"], capture_output=True, text=True, env=env
    )
    assert (
        missing.returncode == 2
        and "'no-such-experiment' is neither a folder nor an MLflow experiment" in missing.stderr
    )


WRITER = textwrap.dedent(
    """
    import sys, time
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=sys.argv[1])
    run = client.create_run(client.get_experiment_by_name("segldm").experiment_id)
    for step in range(int(sys.argv[2])):
        now = int(time.time() * 1000)
        client.log_batch(run.info.run_id, metrics=[Metric("train/loss", 1 / (step + 1), now, step)])
    client.set_terminated(run.info.run_id)
    """
)


@pytest.mark.slow
def test_parallel_writers_on_a_prepared_sqlite_store(tmp_path):
    """4 processes logging at once: no 'database is locked' once tables and experiment exist.

    (On a fresh file the same 4 processes race to run MLflow's schema migrations and to create
    the experiment, and some fail; the sweep callback prepares the store before jobs start.)
    """
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    prepare_tracking_store(uri, "segldm", str(tmp_path / "artifacts"))
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, uri, "60"], stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    errors = [p.communicate(timeout=180)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("segldm").experiment_id])
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    assert all(len(client.get_metric_history(r.info.run_id, "train/loss")) == 60 for r in runs)


FAKE_SBATCH = """#!/bin/sh
cp "$1" "$SBATCH_CAPTURE_DIR/"
echo "sbatch: error: test double, no SLURM controller here" >&2
exit 1
"""


@pytest.mark.slow  # fast tier under ~15 min on 2 cores (docs/tests.md)
def test_slurm_launcher_generates_the_job_array_script(tmp_path, monkeypatch):
    """hydra/launcher=slurm through the real plugin and submitit, up to `sbatch` (a test double
    that keeps the script and refuses the submission): one array task per sweep job, one SLURM
    task and GPU per device on every node, this venv's python."""
    from submitit.core.utils import DelayedSubmission

    bin_dir, capture = tmp_path / "bin", tmp_path / "captured"
    bin_dir.mkdir()
    capture.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit only checks that srun exists
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_CAPTURE_DIR", str(capture))
    args = [
        "-m",
        *TINY_LDM,
        "hparams_search=lr_warmup",
        "hydra/launcher=slurm",
        "trainer=ddp",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        "hydra.launcher.partition=gpu",
        "hydra.sweep.dir=${paths.output_root}/multiruns/slurm",
    ]
    args.remove("trainer=cpu")
    proc = run_train(args, tmp_path, check=False)
    assert proc.returncode != 0 and "test double, no SLURM controller here" in proc.stderr
    (script,) = [p.read_text() for p in capture.iterdir()]
    sbatch = {
        line.split("=", 1)[0]: line.split("=", 1)[1]
        for line in script.splitlines()
        if line.startswith("#SBATCH")
    }
    assert sbatch["#SBATCH --array"] == "0-8%9"  # the 3x3 lr x warm-up grid
    assert sbatch["#SBATCH --nodes"] == "2"
    assert sbatch["#SBATCH --ntasks-per-node"] == "4"  # Lightning's SLURMEnvironment: one task per device
    assert sbatch["#SBATCH --gpus-per-node"] == "4"
    assert sbatch["#SBATCH --partition"] == "gpu"
    assert "export OMP_NUM_THREADS=8" in script
    assert "srun --unbuffered" in script and f"{sys.executable} -u -m submitit.core._submit" in script
    # the pickled array tasks: one per grid point, each with its own overrides
    jobs = [DelayedSubmission.load(p) for p in (tmp_path / "outputs/multiruns/slurm/.submitit").glob("*.pkl")]
    grid = {
        tuple(
            o
            for o in job.args[0]
            if o.startswith(("model.optimization.base_learning_rate=", "scheduler.warm_up_steps="))
        )
        for job in jobs
    }
    assert len(jobs) == 9 and len(grid) == 9
    assert ("model.optimization.base_learning_rate=1e-06", "scheduler.warm_up_steps=10000") in grid


def _hydra_compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize(
    "overrides",
    [
        ["hparams_search=lr_warmup"],
        ["hparams_search=lr_warmup_optuna"],
        ["hydra/launcher=local_parallel"],
        ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=2"],
        ["trainer=ddp"],
    ],
    ids=lambda o: o[0],
)
def test_sweep_presets_compose_and_resolve(overrides, tmp_path):
    cfg = _hydra_compose([*overrides, f"paths.output_root={tmp_path}", "paths.output_dir=" + str(tmp_path)])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    sweeper = OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)
    if "hparams_search=lr_warmup" in overrides:
        assert sweeper["params"] == {
            "model.optimization.base_learning_rate": "1e-6,1e-5,1e-4",
            "scheduler.warm_up_steps": "0,1000,10000",
        }
    if "hparams_search=lr_warmup_optuna" in overrides:
        assert sweeper["_target_"].endswith("OptunaSweeper") and sweeper["direction"] == "minimize"
        assert sweeper["sampler"]["_target_"].endswith("TPESampler") and sweeper["sampler"]["seed"] == 23
        assert sweeper["params"]["model.optimization.base_learning_rate"] == "tag(log, interval(1e-6, 1e-3))"
    if "hydra/launcher=local_parallel" in overrides:
        assert launcher["_target_"].endswith("JoblibLauncher") and launcher["n_jobs"] == 2
    if "hydra/launcher=slurm" in overrides:
        assert launcher["tasks_per_node"] == launcher["gpus_per_node"] == 2 and launcher["nodes"] == 1


def test_optuna_direction_follows_the_objective(tmp_path):
    base = [
        "hparams_search=lr_warmup_optuna",
        f"paths.output_root={tmp_path}",
        f"paths.output_dir={tmp_path}",
    ]
    for objective, direction in (("val/loss", "minimize"), ("val/miou", "maximize"), ("val/fid", "minimize")):
        cfg = _hydra_compose([*base, f"sweep.objective={objective}"])
        assert OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)["direction"] == direction, objective
        assert cfg.sweep.direction == direction
    cfg = _hydra_compose([*base, "sweep.objective=val/miou", "sweep.direction=minimize"])  # the user decides
    assert OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)["direction"] == "minimize"


def test_slurm_preset_refuses_devices_auto(tmp_path):
    cfg = _hydra_compose(["hydra/launcher=slurm", f"paths.output_root={tmp_path}", "paths.output_dir=x"])
    with pytest.raises(
        Exception, match=r"trainer.devices='auto' is not a number of devices.*trainer.devices=4"
    ):
        OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


@pytest.mark.slow
def test_optuna_search_minimises_the_returned_validation_loss(tmp_path):
    """TPE over log-lr and warm-up through Hydra's Optuna sweeper; best = min of the jobs' val/loss.

    Run again, the seeded sampler proposes the same 4 trials: none is trained, the same best."""
    args = [
        "-m",
        *TINY_LDM,
        "hparams_search=lr_warmup_optuna",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.sampler.n_startup_trials=2",
        "scheduler.warm_up_steps=int(interval(0, 4))",  # replaces the preset's search space
        "hydra.sweep.dir=${paths.output_root}/multiruns/optuna",
    ]
    proc = run_train(args, tmp_path, timeout=600)
    sweep_dir = tmp_path / "outputs/multiruns/optuna"
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    runs = sweep_runs(tmp_path, "multiruns/optuna")
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    losses = [r.data.metrics["val/loss"] for r in runs]
    assert results["best_value"] == pytest.approx(min(losses))
    best = min(runs, key=lambda r: r.data.metrics["val/loss"])
    assert float(results["best_params"]["model.optimization.base_learning_rate"]) == pytest.approx(
        float(best.data.params["model/optimization/base_learning_rate"])
    )
    lrs = [float(r.data.params["model/optimization/base_learning_rate"]) for r in runs]
    assert all(1e-6 <= lr <= 1e-3 for lr in lrs) and len(set(lrs)) == 4
    assert (sweep_dir / "report/heatmap.png").is_file()
    assert "Best parameters" in proc.stdout + proc.stderr

    again = run_train(args, tmp_path, timeout=600)
    assert again.stdout.count("already finished") == 4
    assert len(sweep_runs(tmp_path, "multiruns/optuna")) == 4
    rerun = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert rerun["best_value"] == pytest.approx(results["best_value"])
    assert rerun["best_params"] == results["best_params"]


def test_optuna_rdb_storage_is_refused_before_any_job(tmp_path):
    cfg = _hydra_compose(
        ["hparams_search=lr_warmup_optuna", "hydra.sweeper.storage=sqlite:///optuna.db", "paths.output_dir=x"]
    )
    with pytest.raises(
        SweepError, match=r"hydra.sweeper.storage='sqlite:///optuna.db'.*hydra.sweeper.storage=null"
    ):
        check_sweeper(cfg)
    check_sweeper(_hydra_compose(["hparams_search=lr_warmup_optuna", "paths.output_dir=x"]))
