"""`data.precheck=off|headers|full`: bad training files fail at start-up, all named in one error."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image
from rich.console import Console

from segldm.data.check import run_check
from segldm.data.precheck import DataCheckError, precheck_data, precheck_mode, spread
from segldm.errors import StartupError
from tests.conftest import CONF, TINY_FIRST_STAGE, TINY_TRAINER, compose_train, run_train

N_LABELS = 5
SIZE = (13, 17)  # height, width: odd on purpose


def make_dataset(root: Path, n_train: int = 5, n_val: int = 2) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            for kind, array in (
                ("images", rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)),
                ("masks", rng.integers(0, N_LABELS, SIZE, dtype=np.uint8)),
            ):
                path = root / kind / split / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(path)


def break_dataset(root: Path) -> Path:
    """Mask 0 garbage bytes, mask 1 mis-sized, mask 2 an out-of-range label, mask 3 missing."""
    masks = root / "masks/train"
    (masks / "0.png").write_bytes(b"not a png" * 20)
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(masks / "1.png")
    labels = np.zeros(SIZE, np.uint8)
    labels[2, 3] = 99
    Image.fromarray(labels).save(masks / "2.png")
    (masks / "3.png").unlink()
    return masks


def data_cfg(root: Path, *overrides: str):
    return compose_train(
        ["data=folder", f"data.root={root}", f"data.n_labels={N_LABELS}", "data.num_workers=0", *overrides]
    ).data


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    root = tmp_path / "d"
    make_dataset(root)
    break_dataset(root)
    return root


def test_clean_dataset_passes_and_logs_its_time(tmp_path, caplog):
    make_dataset(tmp_path)
    caplog.set_level(logging.INFO, logger="segldm.data.precheck")
    for mode in ("headers", "full"):
        reports = precheck_data(data_cfg(tmp_path, f"data.precheck={mode}"))
        assert [(r.split, r.checked, r.n_errors) for r in reports] == [("train", 5, 0), ("validation", 2, 0)]
        assert f"data precheck (data.precheck={mode}): 5 train + 2 validation samples ok in" in caplog.text


def test_headers_names_every_file_problem_at_once(broken):
    with pytest.raises(DataCheckError) as err:
        precheck_data(data_cfg(broken, "data.precheck_labels=0"))  # data=folder defaults to headers
    text = str(err.value)
    assert "data.precheck=headers found 3 problem(s)" in text
    assert "train: 1 missing file, 1 unreadable file, 1 size mismatch; validation: ok" in text
    assert f"missing {broken}/masks/train/3.png (mask of 3.png)" in text
    assert f"{broken}/masks/train/0.png: mask file is corrupt, its header cannot be decoded" in text
    assert (
        f"{broken}/masks/train/1.png: mask is 5x5 but its image {broken}/images/train/1.png is 17x13" in text
    )
    assert "2.png" not in text  # labels are not read in header mode
    assert "data.precheck=off to skip this scan" in text and "python -m segldm.data.check" in text


def test_headers_reads_the_labels_of_a_spread_sample(broken):
    with pytest.raises(DataCheckError) as err:
        precheck_data(data_cfg(broken, "data.precheck_labels=64"))  # more than the split: every pair
    text = str(err.value)
    assert "data.precheck=headers found 4 problem(s)" in text
    assert f"{broken}/masks/train/2.png: label ids 99 (1 px) are outside [0, data.n_labels=5)" in text
    with pytest.raises(DataCheckError) as err:
        precheck_data(data_cfg(broken, "data.precheck_labels=2"))  # pairs 0 and 3 of 0..3: not 2.png
    assert "2.png: label ids" not in str(err.value)
    with pytest.raises(StartupError, match="data.precheck_labels=-1 must be >= 0"):
        precheck_data(data_cfg(broken, "data.precheck_labels=-1"))


def test_spread_covers_the_split_evenly():
    assert spread(3, 10) == [0, 4, 9]  # 4.5 rounds to even
    assert spread(5, 3) == [0, 1, 2] and spread(1, 7) == [0] and spread(0, 7) == []


def test_full_also_finds_out_of_range_labels(broken):
    with pytest.raises(DataCheckError) as err:
        precheck_data(data_cfg(broken, "data.precheck=full"))
    text = str(err.value)
    assert "data.precheck=full found 4 problem(s)" in text
    assert f"{broken}/masks/train/2.png: label ids 99 (1 px) are outside [0, data.n_labels=5)" in text
    assert "out-of-range label ids: [99]" in text and "data.label_remap" in text


def test_off_skips_the_scan(broken, tmp_path):
    assert precheck_data(data_cfg(broken, "data.precheck=off")) == []
    assert precheck_data(data_cfg(tmp_path / "absent", "data.precheck=off")) == []  # nothing is built


def test_many_problems_are_counted_and_a_few_named(tmp_path):
    make_dataset(tmp_path, n_train=14)
    for i in range(14):
        (tmp_path / f"masks/train/{i}.png").write_bytes(b"garbage")
    with pytest.raises(DataCheckError, match=r"found 14 problem\(s\)[\s\S]*\.\.\. and 4 more"):
        precheck_data(data_cfg(tmp_path))


def test_a_split_that_cannot_be_built_fails_even_with_on_error_skip(tmp_path):
    with pytest.raises(DataCheckError, match="train: cannot be built.*validation: cannot be built") as err:
        precheck_data(data_cfg(tmp_path / "absent", "data.on_error=skip"))
    assert f"image folder {tmp_path}/absent/images/train does not exist" in str(err.value)


def test_on_error_skip_warns_instead_of_failing(broken, caplog):
    caplog.set_level(logging.INFO, logger="segldm.data.precheck")
    reports = precheck_data(data_cfg(broken, "data.on_error=skip"))
    assert reports[0].n_errors == 4  # 3 files + the label ids of 2.png (data.precheck_labels)
    assert "found 4 problem(s)" in caplog.text and "data.on_error=skip drops these samples" in caplog.text


def test_mode_values_and_preset_defaults():
    with pytest.raises(
        ValueError, match="data.precheck='quick' is not supported; expected one of off, headers, full"
    ):
        precheck_mode({"precheck": "quick"})
    assert precheck_mode({"precheck": False}) == "off"  # YAML 1.1 reads an unquoted off as false
    assert precheck_mode({}) == "off"
    for preset, mode in (("folder", "headers"), ("sflckr", "headers"), ("synthetic", "off")):
        assert precheck_mode(compose_train([f"data={preset}"]).data) == mode


def test_data_check_cli_has_the_header_mode(broken):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "check",
            ["data=folder", f"data.root={broken}", f"data.n_labels={N_LABELS}", "workers=0", "mode=headers"],
        )
    console = Console(record=True, width=200)
    assert run_check(cfg, console) == 3
    assert "mask file is corrupt, its header cannot be decoded" in console.export_text()


def test_training_fails_at_startup_before_any_step(broken, tmp_path):
    proc = run_train(
        [
            "model=autoencoder",
            *TINY_FIRST_STAGE,
            *TINY_TRAINER,
            "data=folder",
            f"data.root={broken}",
            f"data.n_labels={N_LABELS}",
            "data.size=16",
            "data.batch_size=2",
            "data.num_workers=0",
            "logger=none",
            "hydra.run.dir=${paths.output_root}/run",
        ],
        tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    assert "data.precheck=headers found 4 problem(s)" in proc.stderr  # 3 files + 2.png's label ids
    assert f"{broken}/masks/train/0.png: mask file is corrupt" in proc.stderr
    assert f"{broken}/masks/train/2.png: label ids 99" in proc.stderr
    assert "data.precheck=off to skip this scan" in proc.stderr
    assert "Epoch" not in proc.stdout + proc.stderr  # no model was built, no step was taken
    assert not (tmp_path / "outputs/run/checkpoints").exists()
