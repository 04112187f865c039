"""One config tree for every entry point (segldm.config.locations), and users' own groups on top of it.

The wheel itself is built and run in tests/integration/test_wheel.py (slow)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from segldm.config.locations import config_dir
from tests.conftest import REPO

PACKAGE = REPO / "segldm"
HYDRA_ENTRY_POINTS = {
    "segldm/train.py": "train",
    "segldm/eval.py": "eval",
    "segldm/sample.py": "sample",
    "segldm/train_segmenter.py": "train_segmenter",
    "segldm/data/check.py": "check",
    "experiments/bench/run.py": "bench",  # the benchmark suite, outside the package
}


def user_groups(root: Path) -> Path:
    """A user's own config folder: a data option that extends the packaged synthetic one."""
    (root / "data").mkdir(parents=True)
    (root / "data" / "mydata.yaml").write_text(
        "defaults:\n  - synthetic\n  - _self_\n\nsize: 40\nn_labels: 5\n"
    )
    return root


def test_the_checkout_tree_is_the_packaged_tree():
    assert (PACKAGE / "conf").is_symlink() and (PACKAGE / "conf").readlink() == Path("../conf")
    assert config_dir() == (REPO / "conf").resolve()
    for primary in HYDRA_ENTRY_POINTS.values():
        assert (config_dir() / f"{primary}.yaml").is_file(), primary


def test_every_entry_point_asks_the_one_function():
    for path, primary in HYDRA_ENTRY_POINTS.items():
        text = (REPO / path).read_text()
        assert f'config_path=hydra_config_path(), config_name="{primary}"' in text, path
    stray = [
        f"{p.relative_to(REPO)}: {m.group(0)}"
        for p in PACKAGE.rglob("*.py")
        if p != PACKAGE / "config" / "locations.py"
        for m in re.finditer(r'config_path="[^"]*"|parents\[\d\] / "conf"', p.read_text())
    ]
    assert stray == [], "use segldm.config.locations.config_dir(): " + str(stray)


def test_user_group_through_hydra_searchpath(tmp_path):
    mine = user_groups(tmp_path / "myconf")
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra.searchpath=[file://{mine}]", "data=mydata"])
    assert (cfg.data.size, cfg.data.n_labels) == (40, 5)
    assert cfg.data.train._target_ == "segldm.data.synthetic.SyntheticScenes"  # from the packaged option


def test_user_group_through_config_dir_on_the_command_line(tmp_path):
    mine = user_groups(tmp_path / "myconf")
    proc = subprocess.run(
        [sys.executable, "-m", "segldm.train", "--config-dir", str(mine), "data=mydata"]
        + ["model.first_stage.ckpt_path=null", "--cfg", "job", "--package", "data"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "size: 40" in proc.stdout and "n_labels: 5" in proc.stdout, proc.stdout
