"""segldm.report in-process: a sweep built by hand in an MLflow store and in a sweep folder."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from segldm.sweeps.jobs import job_key
from segldm.sweeps.markers import MANIFEST_NAME, MARKER_NAME, write_marker
from segldm.sweeps.report import (
    REPORT_TAG,
    ReportError,
    Sweep,
    heatmap_axes,
    is_sweep_dir,
    load_experiment,
    load_sweep_dir,
    main,
    parse_overrides,
    table_rows,
)

GRID = [(lr, warm) for lr in ("1e-05", "0.0001") for warm in ("0", "100")]
FIXED = ["trainer=cpu", "trainer.max_steps=3"]


def overrides_of(lr: str, warm: str) -> list[str]:
    return [*FIXED, f"model.optimization.base_learning_rate={lr}", f"scheduler.warm_up_steps={warm}"]


def final_loss(lr: str, warm: str) -> float:
    return round(0.5 - 1000 * float(lr) + 0.001 * int(warm), 4)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """4 FINISHED runs of sweep 's1' (losses known in closed form), a FAILED retry, another sweep."""
    root = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("sweeps", artifact_location=str(root / "artifacts"))

    def add_run(sweep_id: str, job: int, lr: str, warm: str, status: str, n_steps: int = 3) -> str:
        overrides = overrides_of(lr, warm)
        tags = {
            "segldm.sweep_id": sweep_id,
            "segldm.sweep_key": job_key(overrides),
            "segldm.sweep_job": str(job),
            "segldm.sweep_overrides": json.dumps(overrides),
        }
        run = client.create_run(experiment_id, tags=tags, run_name=f"{sweep_id}-{job}")
        target = final_loss(lr, warm)
        for step in range(n_steps):
            client.log_metric(run.info.run_id, "train/loss", target + 0.1 * (n_steps - step), step=step)
            client.log_metric(run.info.run_id, "val/loss", target + 0.05 * (n_steps - 1 - step), step=step)
        client.set_terminated(run.info.run_id, status)
        return run.info.run_id

    run_ids = [add_run("s1", i, lr, warm, "FINISHED") for i, (lr, warm) in enumerate(GRID)]
    add_run("s1", 3, *GRID[3], "FAILED", n_steps=1)  # an earlier, killed attempt of job 3
    add_run("s0", 0, *GRID[0], "FINISHED")  # an older sweep in the same experiment
    return root, uri, run_ids


def test_experiment_mode_table_marks_the_best_run(store):
    _, uri, _ = store
    sweep = load_experiment("sweeps", uri, "s1", None, "train/loss")
    assert sweep.varying_keys() == ["model.optimization.base_learning_rate", "scheduler.warm_up_steps"]
    header, rows = table_rows(sweep)
    assert header[:4] == ["job", "status", "model.optimization.base_learning_rate", "scheduler.warm_up_steps"]
    assert len(rows) == 5 and sorted(r[1] for r in rows).count("FAILED") == 1
    best_lr, best_warm = min(GRID, key=lambda g: final_loss(*g))
    (winner,) = [r for r in rows if r[0].endswith("*")]
    assert winner[2:4] == [best_lr, best_warm] and float(winner[4]) == pytest.approx(final_loss(*GRID[2]))
    for run in sweep.runs:
        if run.status == "FINISHED":
            lr, warm = (
                run.overrides["model.optimization.base_learning_rate"],
                run.overrides["scheduler.warm_up_steps"],
            )
            assert run.final == pytest.approx(final_loss(lr, warm)) == run.best
            assert run.steps == 3 and [s for s, _ in run.curves["train/loss"]] == [0, 1, 2]


def test_latest_sweep_is_the_default(store):
    _, uri, _ = store
    assert load_experiment("sweeps", uri, None, None, "train/loss").sweep_id == "s0"  # started last


def test_cli_writes_plots_and_logs_one_report_run(store, tmp_path, capsys):
    _, uri, _ = store
    args = ["sweeps", "--tracking-uri", uri, "--sweep-id", "s1", "--out", str(tmp_path / "r")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "sweep s1: 5 runs, metric val/loss" in out and "FAILED" in out
    for name in ("heatmap.png", "curves.png"):
        with Image.open(tmp_path / "r" / name) as image:
            assert image.width > 300 and image.height > 200
    assert "| job | status | model.optimization.base_learning_rate |" in (tmp_path / "r/runs.md").read_text()
    assert main(args) == 0  # again: the same report run is updated, not a second one
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("sweeps")
    reports = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{REPORT_TAG}` = 's1'")
    assert len(reports) == 1
    logged = {a.path for a in client.list_artifacts(reports[0].info.run_id, "report")}
    assert logged == {"report/heatmap.png", "report/curves.png", "report/runs.md", "report/runs.csv"}
    # the report run is not mistaken for a sweep run next time
    assert len(load_experiment("sweeps", uri, "s1", None, "train/loss").runs) == 5


def test_errors_name_what_was_looked_for(store, tmp_path, capsys):
    _, uri, _ = store
    assert main(["nope", "--tracking-uri", uri]) == 2
    assert "'nope' is neither a folder nor an MLflow experiment" in capsys.readouterr().err
    assert main(["sweeps", "--tracking-uri", uri, "--sweep-id", "s9"]) == 2
    assert "has no runs of sweep 's9'" in capsys.readouterr().err
    assert main(["sweeps", "--tracking-uri", f"sqlite:///{tmp_path}/missing.db"]) == 2
    assert "does not exist" in capsys.readouterr().err
    sweep = load_experiment("sweeps", uri, "s1", None, "train/loss")
    with pytest.raises(ReportError, match="'model.lr' is not an override of these runs"):
        heatmap_axes(sweep, "model.lr", None)


def test_sweep_folder_without_mlflow_reports_from_markers(tmp_path):
    """logger=none sweeps: the table and heat map come from the jobs' markers alone."""
    sweep_dir = tmp_path / "multiruns/s2"
    write_marker(sweep_dir / MANIFEST_NAME, {"sweep_id": "s2", "objective": "val/loss"})
    for i, (lr, warm) in enumerate(GRID[:3]):
        overrides = overrides_of(lr, warm)
        write_marker(
            sweep_dir / str(i) / MARKER_NAME,
            {
                "status": "FINISHED",
                "overrides": overrides,
                "objective": final_loss(lr, warm),
                "duration_s": 61.0,
            },
        )
    unfinished = sweep_dir / "3/.hydra"
    unfinished.mkdir(parents=True)
    (unfinished / "overrides.yaml").write_text("\n".join(f"- {o}" for o in overrides_of(*GRID[3])) + "\n")
    assert main([str(sweep_dir), "--no-mlflow"]) == 0
    sweep = load_sweep_dir(sweep_dir, None, "train/loss", None)
    assert [r.status for r in sweep.runs] == ["FINISHED", "FINISHED", "FINISHED", "UNFINISHED"]
    _, rows = table_rows(sweep)
    assert rows[0][-2] == "1m01s" and rows[3][4] == "-"
    # each job's objective is its marker's (the closed form), and the lowest one (lr 1e-4, no warm-up: 0.4) wins
    assert [r.final for r in sweep.runs] == [*(final_loss(lr, warm) for lr, warm in GRID[:3]), None]
    (winner,) = [r for r in rows if r[0].endswith("*")]
    assert winner[:6] == ["2 *", "FINISHED", "0.0001", "0", "0.4", "0.4"]
    assert (sweep_dir / "report/heatmap.png").is_file() and (sweep_dir / "report/curves.png").is_file()


def test_axes_default_to_lr_and_warm_up_else_the_swept_keys():
    def sweep_of(overrides: list[dict[str, str]]) -> Sweep:
        from segldm.sweeps.report import RunRecord

        runs = [RunRecord(name=str(i), status="FINISHED", overrides=o) for i, o in enumerate(overrides)]
        return Sweep("s", "val/loss", "train/loss", runs)

    lr_warm = [parse_overrides(overrides_of(lr, warm)) for lr, warm in GRID]
    assert heatmap_axes(sweep_of(lr_warm), None, None) == (
        "model.optimization.base_learning_rate",
        "scheduler.warm_up_steps",
    )
    seeds = [{"seed": str(s), "trainer": "cpu"} for s in range(3)]
    assert heatmap_axes(sweep_of(seeds), None, None) == ("seed", None)
    assert heatmap_axes(sweep_of([{"a": "1"}, {"a": "1"}]), None, None) is None
    assert parse_overrides(["+x.y=1", "a=b=c"]) == {"x.y": "1", "a": "b=c"}


def test_reading_a_folder_that_is_not_a_sweep_fails_clearly(tmp_path):
    with pytest.raises(ReportError, match="holds no sweep jobs"):
        load_sweep_dir(tmp_path, None, "train/loss", None)
    assert not is_sweep_dir(tmp_path)  # so the CLI reads it as an experiment name, not as a folder
    assert list(tmp_path.iterdir()) == []  # and nothing was written into it
