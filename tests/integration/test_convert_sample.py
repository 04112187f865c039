"""The CompVis CLIs in subprocesses: convert -> fine-tune (init_from) -> sample (masks=val) -> export.

Uses the reference fixture (its 1 M-parameter LDM at 32 px) and the fixture's four S-FLCKR-layout
files as data, so the whole chain runs in well under a minute on the CPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segldm.runtime.loading import load_ldm
from tests.compvis_fixtures import fixtures_dir, model_fixture_dirs
from tests.conftest import REPO

FIXTURES = model_fixture_dirs()
DATA_FILES = fixtures_dir() / "data" / "files"
pytestmark = pytest.mark.skipif(
    not FIXTURES or not DATA_FILES.is_dir(), reason=f"CompVis fixtures not found under {fixtures_dir()}"
)


def run(module: str, args: list[str], root: Path, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` with every default path under `root`, one intra-op thread."""
    env = {**os.environ, "SEGLDM_ROOT": str(root), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{module} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def sflckr_root(tmp: Path) -> Path:
    """The fixture's image/mask pairs in segldm's default S-FLCKR layout (train and eval lists)."""
    root = tmp / "sflckr"
    shutil.copytree(DATA_FILES / "images", root / "images")
    shutil.copytree(DATA_FILES / "segmentations", root / "segmentations")
    for name in ("sflckr_train.txt", "sflckr_eval.txt"):
        shutil.copy(DATA_FILES / "list.txt", root / name)
    return root


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """convert (CLI) -> train --config-dir (init_from, 2 steps) -> the run's last.ckpt."""
    tmp = tmp_path_factory.mktemp("compvis_cli")
    folder = FIXTURES[0]
    conv = tmp / "converted"
    data_root = sflckr_root(tmp)
    run(
        "segldm.convert",
        ["compvis", "--config", str(folder / "config.yaml"), "--ckpt", str(folder / "model.ckpt"), "--out", str(conv), "--data-root", str(data_root)],
        tmp,
    )  # fmt: skip
    train = run(
        "segldm.train",
        [
            "--config-dir", str(conv), "--config-name", "config",
            "trainer=cpu", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
            "trainer.log_every_n_steps=1", "logger=none", "data.batch_size=2", "data.num_workers=0",
            "data.persistent_workers=false", "data.pin_memory=false", "model.optimization.base_learning_rate=1e-3",
            "model.optimization.scale_lr=false", "scheduler.warm_up_steps=[0]", "callbacks.model_checkpoint.every_n_train_steps=2",
            "callbacks.sample_grid.every_n_steps=0", "callbacks.sample_grid.num_samples=2", "callbacks.sample_grid.ddim_steps=2",
            f"hydra.run.dir={tmp / 'finetune'}",
        ],
        tmp,
    )  # fmt: skip
    return tmp, folder, conv, train


def test_convert_writes_a_native_checkpoint_and_a_composable_config(chain):
    tmp, folder, conv, _ = chain
    native = torch.load(conv / "model.ckpt", map_location="cpu", weights_only=True)
    assert native["segldm"]["kind"] == "ldm"
    config = native["segldm"]["config"]
    assert config["model"]["_target_"] == "segldm.training.ldm.LatentDiffusion"
    assert config["data"]["size"] == 32 and config["data"]["n_labels"] == 182
    assert config["init_from"] == str(conv / "model.ckpt")
    original = torch.load(folder / "model.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert native["state_dict"].keys() == original.keys()
    assert all(torch.equal(native["state_dict"][k], v) for k, v in original.items())


def test_finetune_starts_from_the_converted_weights_and_writes_a_safe_checkpoint(chain):
    tmp, _, conv, _ = chain
    last = tmp / "finetune" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    model = load_ldm(
        last
    )  # weights_only: the Lightning checkpoint (optimizer, loops, segldm config) is plain data
    start = torch.load(conv / "model.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    trained = torch.load(last, map_location="cpu", weights_only=True)
    assert trained["global_step"] == 2 and trained["segldm"]["config"]["init_from"] == str(
        conv / "model.ckpt"
    )
    sd = trained["state_dict"]
    # the frozen first stage is exactly the CompVis one; the UNet moved away from it (lr 1e-3, 2 steps)
    assert all(torch.equal(sd[k], v) for k, v in start.items() if k.startswith("first_stage_model."))
    key = "model.diffusion_model.out.2.weight"
    assert not torch.equal(sd[key], start[key])
    assert model.state_dict().keys() == sd.keys()


def test_sample_from_the_checkpoint_data_split_and_export_round_trip(chain):
    tmp, _, _, _ = chain
    last = tmp / "finetune" / "checkpoints" / "last.ckpt"
    out = tmp / "samples"
    proc = run(
        "segldm.sample",
        [f"ckpt={last}", "masks=val", "num_samples=2", "steps=2", "batch_size=2", f"out_dir={out}"],
        tmp,
    )
    for name in ("val_00000", "val_00001"):
        assert (out / "samples" / f"{name}.png").is_file() and (out / "conditions" / f"{name}.png").is_file()
    assert (out / "grid.png").is_file() and "grid:" in proc.stdout
    exported = tmp / "exported"
    run("segldm.convert", ["export", "--ckpt", str(last), "--out", str(exported)], tmp)
    a = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(exported / "model.ckpt", map_location="cpu", weights_only=True)
    assert b["global_step"] == 2 and b["state_dict"].keys() == a.keys()
    assert all(torch.equal(a[k], b["state_dict"][k]) for k in a)
    assert "ldm.models.diffusion.ddpm.LatentDiffusion" in (exported / "config.yaml").read_text()


def test_cli_names_the_file_and_the_kind_it_expected(chain):
    tmp, folder, conv, _ = chain
    proc = run(
        "segldm.convert",
        ["compvis", "--config", str(folder / "config.yaml"), "--ckpt", str(conv / "model.ckpt"), "--out", str(tmp / "x")],
        tmp,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert (
        f"{conv / 'model.ckpt'}: expected a CompVis LatentDiffusion checkpoint, but this is a segldm LDM"
        in proc.stderr
    )
    assert "Traceback" not in proc.stderr
