"""`python -m segldm.report <sweep folder | MLflow experiment>`: a sweep's runs as a table and plots.

Reads a sweep either from its folder (`outputs/multiruns/...`: the `sweep_job.json` markers the
jobs wrote, plus their MLflow runs) or from an MLflow experiment (runs tagged `segldm.sweep_id`;
the most recent sweep unless `--sweep-id` says which). Prints one line per run (the overrides
that differ between runs, final and best value of the metric, steps, duration, status) and
writes into `--out`:

- `runs.md` / `runs.csv`: the table;
- `heatmap.png`: the metric over two swept keys (default learning rate x warm-up);
- `curves.png`: the training-loss and metric curves of all runs in one figure.

The files are also logged to MLflow, as artifacts of one `report <sweep id>` run per sweep in
the same experiment (re-running the report updates that run).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import segldm.metrics.alignment  # noqa: F401  (defining the built-in metrics registers their directions)
import segldm.metrics.image_quality  # noqa: F401
from segldm.config.metric_directions import objective_direction
from segldm.sweeps.markers import MANIFEST_NAME, MARKER_NAME, read_marker

DEFAULT_AXES = ("model.optimization.base_learning_rate", "scheduler.warm_up_steps")
REPORT_TAG = "segldm.sweep_report"


class ReportError(RuntimeError):
    """Nothing to report on; the message says what was looked for and where."""


@dataclass
class RunRecord:
    """One run of a sweep, from its marker and/or its MLflow run."""

    name: str
    status: str
    overrides: dict[str, str]
    job: int | None = None
    run_id: str | None = None
    output_dir: str | None = None
    final: float | None = None
    best: float | None = None
    steps: int | None = None
    duration_s: float | None = None
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


@dataclass
class Sweep:
    sweep_id: str
    metric: str
    curve: str
    runs: list[RunRecord]
    tracking_uri: str | None = None
    experiment_id: str | None = None
    direction: str = "minimize"  # of the metric: "maximize" for val/miou and the like

    @property
    def better(self) -> Any:
        """max or min: which of two values of the metric is the better one."""
        return max if self.direction == "maximize" else min

    def varying_keys(self) -> list[str]:
        """Override keys whose value differs between runs (the swept ones), in first-seen order."""
        keys: list[str] = []
        for run in self.runs:
            keys += [k for k in run.overrides if k not in keys]
        return [k for k in keys if len({run.overrides.get(k) for run in self.runs}) > 1]


# ------------------------------------------------------------------------------------- reading
def parse_overrides(overrides: Sequence[str]) -> dict[str, str]:
    """['a.b=1', '+c=x'] -> {'a.b': '1', 'c': 'x'} (keys without Hydra's +/~ prefixes)."""
    parsed = {}
    for item in overrides:
        key, _, value = item.partition("=")
        parsed[key.lstrip("+~")] = value
    return parsed


def _history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    points = sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key))
    return [(step, value) for step, _, value in points]


def _fill_from_mlflow(
    record: RunRecord, run: Any, client: Any, metric: str, curve: str, direction: str = "minimize"
) -> None:
    record.run_id = run.info.run_id
    if record.status != "FINISHED (reused)":
        record.status = run.info.status
    if run.info.end_time and run.info.start_time and record.duration_s is None:
        record.duration_s = (run.info.end_time - run.info.start_time) / 1000.0
    record.curves = {key: _history(client, run.info.run_id, key) for key in dict.fromkeys((curve, metric))}
    values = [v for _, v in record.curves.get(metric, []) if math.isfinite(v)]
    if values:
        record.final = record.curves[metric][-1][1]
        record.best = max(values) if direction == "maximize" else min(values)
    steps = [s for s, _ in record.curves.get(curve, [])]
    if steps:
        record.steps = max(steps) + 1


def _client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise ReportError(
            f"MLflow store {tracking_uri} does not exist; pass --tracking-uri of the sweep's store"
        )
    return MlflowClient(tracking_uri=tracking_uri)


def load_sweep_dir(sweep_dir: Path, metric: str | None, curve: str, tracking_uri: str | None) -> Sweep:
    """A sweep from its folder: job folders (`.hydra/overrides.yaml`) and their markers."""
    manifest = read_marker(sweep_dir / MANIFEST_NAME) or {}
    direction = manifest.get("direction") if metric is None else None
    metric = metric or manifest.get("objective") or "val/loss"
    direction = direction or objective_direction(metric)
    job_dirs = sorted(
        {p.parent for p in sweep_dir.glob(f"*/{MARKER_NAME}")}
        | {p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")},
        key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name),
    )
    if not job_dirs:
        raise ReportError(
            f"{sweep_dir} holds no sweep jobs (no */{MARKER_NAME} or */.hydra/overrides.yaml); "
            "give the folder of a `python -m segldm.train -m ...` run (outputs/multiruns/...)"
        )
    records, sweep_id = [], manifest.get("sweep_id")
    uri = tracking_uri or manifest.get("tracking_uri")
    for job_dir in job_dirs:
        marker = read_marker(job_dir / MARKER_NAME)
        if marker:
            overrides = marker.get("overrides", [])
            sweep_id = sweep_id or marker.get("sweep_id")
            uri = uri or marker.get("tracking_uri")
            status = "FINISHED (reused)" if marker.get("reused_from") else marker.get("status", "FINISHED")
        else:
            overrides = yaml.safe_load((job_dir / ".hydra/overrides.yaml").read_text()) or []
            status = "UNFINISHED"
        record = RunRecord(
            name=job_dir.name,
            status=status,
            overrides=parse_overrides(overrides),
            job=int(job_dir.name) if job_dir.name.isdigit() else None,
            run_id=(marker or {}).get("run_id"),
            output_dir=str(job_dir),
            duration_s=(marker or {}).get("duration_s"),
        )
        if marker and marker.get("objective") is not None:
            record.final = record.best = float(marker["objective"])
        records.append(record)

    experiment_id = manifest.get("experiment_id")
    if uri:
        client = _client(uri)
        for record in records:
            run = None
            if record.run_id:
                run = client.get_run(record.run_id)
            elif experiment_id is not None:  # a job without a marker: find its run by output folder
                found = client.search_runs(
                    [experiment_id],
                    filter_string=f"tags.`segldm.output_dir` = '{record.output_dir}'",
                    order_by=["attributes.start_time DESC"],
                    max_results=1,
                )
                run = found[0] if found else None
            if run is not None:
                experiment_id = experiment_id or run.info.experiment_id
                _fill_from_mlflow(record, run, client, metric, curve, direction)
    return Sweep(
        sweep_id=str(sweep_id or sweep_dir.name),
        metric=metric,
        curve=curve,
        runs=records,
        tracking_uri=uri,
        experiment_id=experiment_id,
        direction=direction,
    )


def load_experiment(
    experiment_name: str, tracking_uri: str, sweep_id: str | None, metric: str | None, curve: str
) -> Sweep:
    """A sweep from MLflow: the runs of `experiment_name` tagged with the sweep id."""
    client = _client(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        names = [e.name for e in client.search_experiments()]
        raise ReportError(
            f"{experiment_name!r} is neither a folder nor an MLflow experiment in {tracking_uri} "
            f"(experiments: {names}); give a sweep folder (outputs/multiruns/...) or an experiment name"
        )
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string="tags.`segldm.sweep_id` != ''",
        order_by=["attributes.start_time ASC"],
        max_results=5000,
    )
    runs = [r for r in runs if REPORT_TAG not in r.data.tags]
    if not runs:
        raise ReportError(
            f"experiment {experiment_name!r} in {tracking_uri} has no sweep runs (tag segldm.sweep_id)"
        )
    if sweep_id is None:  # the sweep of the most recently started run
        sweep_id = max(runs, key=lambda r: r.info.start_time).data.tags["segldm.sweep_id"]
    runs = [r for r in runs if r.data.tags.get("segldm.sweep_id") == sweep_id]
    if not runs:
        raise ReportError(f"experiment {experiment_name!r} has no runs of sweep {sweep_id!r}")
    metric = metric or "val/loss"
    records = []
    for run in runs:
        tags = run.data.tags
        overrides = json.loads(tags["segldm.sweep_overrides"]) if "segldm.sweep_overrides" in tags else []
        job = tags.get("segldm.sweep_job")
        record = RunRecord(
            name=run.info.run_name or run.info.run_id[:8],
            status=run.info.status,
            overrides=parse_overrides(overrides),
            job=int(job) if job is not None and job.isdigit() else None,
            output_dir=tags.get("segldm.output_dir"),
        )
        _fill_from_mlflow(record, run, client, metric, curve, objective_direction(metric))
        records.append(record)
    return Sweep(
        sweep_id, metric, curve, records, tracking_uri, experiment.experiment_id, objective_direction(metric)
    )


# ------------------------------------------------------------------------------------- output
def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if math.isfinite(value) else str(value)


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def table_rows(sweep: Sweep) -> tuple[list[str], list[list[str]]]:
    keys = sweep.varying_keys()
    header = [
        "job",
        "status",
        *keys,
        f"{sweep.metric} final",
        f"{sweep.metric} best",
        "steps",
        "duration",
        "run",
    ]
    finished = [r for r in sweep.runs if r.status.startswith("FINISHED") and r.final is not None]
    winner = sweep.better(finished, key=lambda r: r.final) if finished else None
    rows = []
    for run in sweep.runs:
        job = str(run.job) if run.job is not None else run.name
        rows.append(
            [
                job + (" *" if run is winner else ""),
                run.status,
                *[run.overrides.get(k, "-") for k in keys],
                _fmt(run.final),
                _fmt(run.best),
                str(run.steps) if run.steps is not None else "-",
                _fmt_duration(run.duration_s),
                (run.run_id or "-")[:8],
            ]
        )
    return header, rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _sort_values(values: set[str]) -> list[str]:
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


def heatmap_axes(sweep: Sweep, x: str | None, y: str | None) -> tuple[str, str | None] | None:
    """(x key, y key or None): the requested keys, else learning rate x warm-up, else the first two swept."""
    varying = sweep.varying_keys()
    for key in (x, y):
        if key is not None and not any(key in r.overrides for r in sweep.runs):
            raise ReportError(f"--x/--y {key!r} is not an override of these runs; swept keys: {varying}")
    if x is not None:
        return x, y
    if all(k in varying for k in DEFAULT_AXES):
        return DEFAULT_AXES
    if not varying:
        return None
    return (varying[0], varying[1]) if len(varying) > 1 else (varying[0], None)


def plot_heatmap(sweep: Sweep, x_key: str, y_key: str | None, stat: str, path: Path) -> Path:
    """Metric (final or best of each FINISHED run) over two swept keys; empty cells grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    done = [r for r in sweep.runs if r.status.startswith("FINISHED")]
    xs = _sort_values({r.overrides.get(x_key, "-") for r in sweep.runs})
    ys = _sort_values({r.overrides.get(y_key, "-") for r in sweep.runs}) if y_key else ["-"]
    grid = np.full((len(ys), len(xs)), np.nan)
    for run in done:  # later runs of the same cell (a resumed job) win
        value = run.final if stat == "final" else run.best
        if value is not None:
            grid[
                ys.index(run.overrides.get(y_key, "-") if y_key else "-"),
                xs.index(run.overrides.get(x_key, "-")),
            ] = value
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(xs), 1.4 + 0.9 * len(ys)))
    cmap = matplotlib.colormaps["viridis_r"].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto")
    finite = grid[np.isfinite(grid)]
    for (i, j), value in np.ndenumerate(grid):
        text = _fmt(float(value), 3) if np.isfinite(value) else "n/a"
        dark = (
            finite.size and np.isfinite(value) and value > (finite.min() + finite.max()) / 2
        )  # viridis_r: high = dark
        ax.text(j, i, text, ha="center", va="center", fontsize=9, color="white" if dark else "black")
    ax.set_xticks(range(len(xs)), xs)
    ax.set_yticks(range(len(ys)), ys)
    ax.set_xlabel(x_key)
    ax.set_ylabel(y_key or "")
    ax.set_title(f"{sweep.metric} ({stat}) - sweep {sweep.sweep_id}", fontsize=9)
    fig.colorbar(image, ax=ax, label=sweep.metric)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(sweep: Sweep, path: Path) -> Path:
    """All runs' training-loss and metric curves, one panel each, labelled by their swept overrides."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sweep.varying_keys()
    panels = list(dict.fromkeys((sweep.curve, sweep.metric)))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], panels, strict=True):
        for run in sweep.runs:
            points = run.curves.get(metric, [])
            if not points:
                continue
            label = ", ".join(f"{k.rsplit('.', 1)[-1]}={run.overrides.get(k, '-')}" for k in keys) or run.name
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o" if len(points) < 20 else None, ms=3, lw=1.2, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.set_title(metric, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.has_data():
            positive = all(v > 0 for line in ax.get_lines() for v in line.get_ydata())
            if positive:
                ax.set_yscale("log")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0, 0.8, 1))
    else:
        fig.tight_layout()
    fig.suptitle(f"sweep {sweep.sweep_id}", fontsize=9, y=1.0)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def log_report(sweep: Sweep, files: list[Path]) -> str | None:
    """Log the report files to one `report <sweep id>` MLflow run of the sweep's experiment."""
    if not sweep.tracking_uri or sweep.experiment_id is None:
        return None
    client = _client(sweep.tracking_uri)
    found = client.search_runs(
        [sweep.experiment_id], filter_string=f"tags.`{REPORT_TAG}` = '{sweep.sweep_id}'", max_results=1
    )
    if found:
        run_id = found[0].info.run_id
    else:
        run = client.create_run(
            sweep.experiment_id, run_name=f"report {sweep.sweep_id}", tags={REPORT_TAG: sweep.sweep_id}
        )
        run_id = run.info.run_id
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path="report")
    client.set_terminated(run_id, "FINISHED")
    return run_id


def write_report(
    sweep: Sweep,
    out_dir: Path,
    x: str | None = None,
    y: str | None = None,
    stat: str = "final",
    log_to_mlflow: bool = True,
) -> dict[str, Any]:
    """Print the table, write table/plots under out_dir, log them to MLflow; returns what was made."""
    out_dir.mkdir(parents=True, exist_ok=True)
    header, rows = table_rows(sweep)
    text = format_table(header, rows)
    print(f"sweep {sweep.sweep_id}: {len(sweep.runs)} runs, metric {sweep.metric} (* = best final)")
    print(text, flush=True)
    files = [out_dir / "runs.md", out_dir / "runs.csv"]
    files[0].write_text(markdown_table(header, rows) + "\n")
    with files[1].open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    axes = heatmap_axes(sweep, x, y)
    if axes is not None:
        files.append(plot_heatmap(sweep, axes[0], axes[1], stat, out_dir / "heatmap.png"))
    files.append(plot_curves(sweep, out_dir / "curves.png"))
    run_id = log_report(sweep, files) if log_to_mlflow else None
    print(f"report: {out_dir}" + (f" (MLflow run {run_id})" if run_id else ""), flush=True)
    return {"files": files, "mlflow_run_id": run_id, "header": header, "rows": rows}


def report_sweep_dir(sweep_dir: Path, metric: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """The report of a sweep folder into `<sweep_dir>/report/` (what the sweep callback runs)."""
    sweep = load_sweep_dir(
        Path(sweep_dir), metric, kwargs.pop("curve", "train/loss"), kwargs.pop("tracking_uri", None)
    )
    return write_report(sweep, Path(sweep_dir) / "report", **kwargs)


def is_sweep_dir(path: Path) -> bool:
    """A folder written by a multirun (its manifest, job markers or job configs), not any folder."""
    return path.is_dir() and (
        (path / MANIFEST_NAME).is_file()
        or any(path.glob(f"*/{MARKER_NAME}"))
        or any(path.glob("*/.hydra/overrides.yaml"))
    )


def default_tracking_uri() -> str:
    root = Path(os.environ.get("SEGLDM_ROOT") or Path.cwd())
    return f"sqlite:///{root.resolve()}/outputs/mlflow.db"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segldm.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="a sweep folder (outputs/multiruns/...) or an MLflow experiment name")
    parser.add_argument("--metric", help="metric to rank by (default: the sweep's objective, val/loss)")
    parser.add_argument("--curve", default="train/loss", help="training curve to plot (default train/loss)")
    parser.add_argument("--stat", choices=("final", "best"), default="final", help="heat map value per run")
    parser.add_argument("--x", help="heat map x key (default model.optimization.base_learning_rate)")
    parser.add_argument("--y", help="heat map y key (default scheduler.warm_up_steps)")
    parser.add_argument("--sweep-id", help="experiment mode: which sweep (default: the latest)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: the sweep's, or outputs/mlflow.db)")
    parser.add_argument(
        "--out", type=Path, help="output folder (default <sweep>/report or outputs/reports/...)"
    )
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the report to MLflow")
    args = parser.parse_args(argv)
    try:
        target = Path(args.target)
        if is_sweep_dir(target):
            sweep = load_sweep_dir(target.resolve(), args.metric, args.curve, args.tracking_uri)
            out = args.out or target / "report"
        else:
            uri = args.tracking_uri or default_tracking_uri()
            sweep = load_experiment(args.target, uri, args.sweep_id, args.metric, args.curve)
            safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in sweep.sweep_id)
            store = (
                Path(uri.removeprefix("sqlite:///")).parent
                if uri.startswith("sqlite:///")
                else Path("outputs")
            )
            out = args.out or store / "reports" / args.target / safe_id
        write_report(sweep, Path(out), args.x, args.y, args.stat, log_to_mlflow=not args.no_mlflow)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
