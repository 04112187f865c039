"""The quality/alignment front of an eval multirun (segldm.sweeps.front): Pareto points, directions read
from metrics.json, one plot per protocol card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from segldm.report import main as report_main
from segldm.sweeps.front import ReportError, card_difference, is_eval_multirun, pareto_front, write_front

MIN_MAX = ("minimize", "maximize")


def test_pareto_front_lower_x_higher_y() -> None:
    points = [
        [200, 0.80],
        [190, 0.70],
        [210, 0.85],
        [205, 0.79],
        [190, 0.70],
        [None, 0.99],
        [180, float("nan")],
    ]
    # (205, .79) is dominated by (200, .80); the duplicate (190, .70) dominates neither copy; missing values are never on it
    assert pareto_front(points, MIN_MAX) == [True, True, True, False, True, False, False]


def test_pareto_front_follows_the_directions_given() -> None:
    points = [[1.0, 1.0], [2.0, 2.0], [1.0, 2.0]]
    assert pareto_front(points, ("minimize", "maximize")) == [False, False, True]
    assert pareto_front(points, ("maximize", "maximize")) == [False, True, False]
    assert pareto_front(points, ("minimize", "minimize")) == [True, False, False]
    assert pareto_front([], MIN_MAX) == []
    with pytest.raises(ValueError, match="'lower'"):
        pareto_front(points, ("lower", "maximize"))


def write_job(folder: Path, job: int, overrides: list[str], fid: float, miou: float, **card: object) -> None:
    job_dir = folder / str(job)
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    protocol_card = {
        "protocol": None,
        "dataset": "synthetic",
        "num_samples": 64,
        "resolution": [64, 64],
        "image_format": "png",
        "metrics": {"inception": {"weights": {"sha256": "abc", "path": f"/somewhere/{job}.pth"}}},
        "mask_perturbation": None,
        "card_key": "k1",
        **card,
    }
    metrics = {
        "fid": fid,
        "miou": miou,
        "bootstrap": {
            "draws": 100,
            "level": 0.95,
            "fid": [fid - 5, fid + 6],
            "miou": [miou - 0.02, miou + 0.01],
        },
        "directions": {"fid": "minimize", "miou": "maximize"},
        "sampler": {"unet_evaluations_per_image": 50},
        "protocol_card": protocol_card,
    }
    (job_dir / "metrics.json").write_text(json.dumps(metrics))


def sweep(folder: Path) -> Path:
    write_job(folder, 0, ["eval.guidance_scale=1", "eval.sampler=ddim", "ckpt=x"], 200.0, 0.80)
    write_job(folder, 1, ["eval.guidance_scale=2", "eval.sampler=ddim", "ckpt=x"], 205.0, 0.85)
    write_job(folder, 2, ["eval.guidance_scale=1", "eval.sampler=dpm_solver++", "ckpt=x"], 207.0, 0.70)
    (folder / "3" / ".hydra").mkdir(parents=True)  # a job that failed: no metrics.json
    return folder


def test_front_report_of_an_eval_multirun(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = sweep(tmp_path / "multirun")
    assert is_eval_multirun(folder) and not is_eval_multirun(tmp_path)
    assert report_main([str(folder)]) == 0  # segldm.report sends an eval multirun to the front
    assert "Pareto front 0, 1" in capsys.readouterr().out
    md = (folder / "report" / "front.md").read_text()
    assert (folder / "report" / "front.png").stat().st_size > 1000
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| job | eval.guidance_scale | eval.sampler | fid [95 % CI] | miou [95 % CI]")
    assert rows[1].startswith("| 0 * | 1 | ddim | 200.00 [195.00, 206.00] | 0.8000 [0.7800, 0.8100]")
    assert rows[2].startswith("| 1 * |") and rows[3].startswith("| 2 |")
    assert "without metrics.json (failed or unfinished): 3" in md


def test_directions_come_from_metrics_json_not_from_names(tmp_path: Path) -> None:
    folder = sweep(tmp_path / "multirun")
    for job in (0, 1, 2):  # a metric whose higher FID-named value is better: the front flips
        path = folder / str(job) / "metrics.json"
        metrics = json.loads(path.read_text())
        metrics["directions"]["fid"] = "maximize"
        path.write_text(json.dumps(metrics))
    assert write_front(folder, tmp_path / "out")["fronts"] == {"k1": ["1", "2"]}
    metrics["directions"].pop("fid")
    path.write_text(json.dumps(metrics))
    with pytest.raises(ReportError, match="directions.*'fid'.*missing in some runs"):
        write_front(folder, tmp_path / "out")


def test_runs_of_different_cards_are_refused_in_one_plot_naming_the_difference(tmp_path: Path) -> None:
    folder = sweep(tmp_path / "multirun")
    perturbed = {"name": "downsample", "params": {"factor": 4}, "seed": 0}
    write_job(
        folder,
        4,
        ["eval.guidance_scale=1"],
        220.0,
        0.6,
        card_key="k2",
        num_samples=128,
        mask_perturbation=perturbed,
    )
    with pytest.raises(
        ReportError, match=r"(?s)2 different protocol cards.*num_samples: 64 vs 128.*--by-card"
    ):
        write_front(folder, tmp_path / "out")
    made = write_front(folder, tmp_path / "out", by_card=True)
    assert made["fronts"] == {"k1": ["0", "1"], "k2": ["4"]}
    assert (tmp_path / "out" / "front_k1.png").is_file() and (tmp_path / "out" / "front_k2.png").is_file()
    assert "mask_perturbation.name" in (tmp_path / "out" / "front.md").read_text()
    assert report_main([str(folder)]) == 2


def test_card_difference_ignores_file_locations() -> None:
    a = {"metrics": {"inception": {"weights": {"sha256": "abc", "path": "/a.pth"}}}, "num_samples": 64}
    b = {"metrics": {"inception": {"weights": {"sha256": "abc", "path": "/b.pth"}}}, "num_samples": 64}
    assert card_difference(a, b) == []
    b["metrics"]["inception"]["weights"]["sha256"] = "def"
    assert card_difference(a, b) == ['metrics.inception.weights.sha256: "abc" vs "def"']
