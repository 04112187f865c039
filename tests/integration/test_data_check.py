"""`python -m segldm.data.check`: a clean dataset passes (exit 0), a broken one fails (exit 1) naming files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image
from rich.console import Console

from segldm.data.check import run_check
from tests.compvis_fixtures import fixtures_dir
from tests.conftest import CONF, REPO

FILES = fixtures_dir() / "data" / "files"


def run_check_cli(args: list[str], root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SEGLDM_ROOT": str(root), "PYTHONUNBUFFERED": "1", "COLUMNS": "160"}
    return subprocess.run(
        [sys.executable, "-m", "segldm.data.check", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def make_folder_dataset(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for i in range(n):
            labels = rng.integers(0, 5, size=(6, 8)).repeat(4, 0).repeat(4, 1).astype(np.uint8)
            labels[0, 0] = 255  # the ignore label
            for kind, array in (
                ("images", rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)),
                ("masks", labels),
            ):
                path = root / kind / split / f"scene/{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(path)


FOLDER_ARGS = ["data=folder", "data.n_labels=5", "data.ignore_label=255", "workers=0"]


def test_clean_folder_dataset_passes_with_report(tmp_path):
    make_folder_dataset(tmp_path / "d")
    report = tmp_path / "report.json"
    proc = run_check_cli([*FOLDER_ARGS, f"data.root={tmp_path / 'd'}", f"report={report}"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dataset check" in proc.stdout and "OK" in proc.stdout
    data = json.loads(report.read_text())
    assert (data["train"]["samples"], data["validation"]["samples"]) == (4, 2)
    assert data["train"]["ignored_pixels"] == 4 and sum(data["train"]["histogram"]) == 4 * (24 * 32 - 1)
    assert all(not split["problems"] and split["fatal"] is None for split in data.values())


def test_broken_folder_dataset_fails_naming_every_file(tmp_path):
    root = tmp_path / "d"
    make_folder_dataset(root)
    train_images, train_masks = root / "images/train/scene", root / "masks/train/scene"
    (train_images / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(50))  # corrupt image
    (train_masks / "1.png").unlink()  # missing mask
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(train_masks / "2.png")  # size mismatch
    bad = np.zeros((24, 32), np.uint8)
    bad[3, 3] = 77
    Image.fromarray(bad).save(train_masks / "3.png")  # label out of range
    Image.fromarray(bad).save(train_masks / "orphan.png")  # unpaired mask: a warning
    report = tmp_path / "report.json"
    proc = run_check_cli([*FOLDER_ARGS, f"data.root={root}", f"report={report}"], tmp_path)
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert "FAILED: 4 problem(s)" in out
    assert "images/train/scene/0.png: image file is corrupt or truncated" in out
    assert "masks/train/scene/1.png (mask of scene/1.png)" in out
    assert "masks/train/scene/2.png: mask is 10x10 but its image" in out
    assert "masks/train/scene/3.png: label ids 77 (1 px)" in out
    assert "1 masks have no image" in out
    train = json.loads(report.read_text())["train"]
    assert train["counts"] == {
        "missing file": 1,
        "unreadable file": 1,
        "size mismatch": 1,
        "label out of range": 1,
    }
    assert train["out_of_range_ids"] == [77] and train["unpaired_masks"][0].endswith("orphan.png")


@pytest.mark.skipif(not FILES.is_dir(), reason=f"CompVis data fixture not at {FILES}")
def test_sflckr_layout_passes(tmp_path):
    root = tmp_path / "sflckr"
    shutil.copytree(FILES, root)
    proc = run_check_cli(
        [
            "data=sflckr",
            f"data.root={root}",
            "data.train_list=list.txt",
            "data.eval_list=list.txt",
            "workers=0",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "labels never occur" in proc.stdout


def test_missing_root_is_an_error_for_each_split(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("check", ["data=sflckr", f"data.root={tmp_path}/absent", "workers=0"])
    console = Console(record=True, width=200)
    assert run_check(cfg, console) == 2
    text = console.export_text()
    assert f"SFLCKR dataset not found at {tmp_path}/absent" in text and "FAILED: 2 problem(s)" in text
