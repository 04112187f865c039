"""The built wheel as a user gets it: installed into a throwaway venv, run from a folder with no checkout.

The wheel is built from a copy of the working tree (pyproject.toml, README, LICENSE, NOTICE, segldm/ with
its conf symlink, conf/), so no build/ left in the checkout can leak into it. The venv reuses this
environment's packages (torch, Lightning, ...) through a .pth file and gets segldm with --no-deps:
`python -m venv --system-site-packages` would reuse the base interpreter's packages, not this venv's.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TINY_DATA, TINY_FIRST_STAGE, TINY_TRAINER, TINY_UNET

pytestmark = pytest.mark.slow

SOURCE_FILES = ("pyproject.toml", "README.md", "LICENSE", "NOTICE")


def run(args: list[str | Path], cwd: Path, env: dict[str, str], timeout: int = 600) -> str:
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc.stdout + proc.stderr


def build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    src.mkdir()
    for name in SOURCE_FILES:
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "conf", src / "conf")
    shutil.copytree(
        REPO / "segldm", src / "segldm", symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
    )
    assert (src / "segldm" / "conf").is_symlink()
    dist = tmp / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", dist, src]
    run(build, tmp, {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    (wheel,) = dist.glob("segldm-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path | dict[str, str]]:
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(tmp)
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], tmp, dict(os.environ))
    python = venv / "bin" / "python"
    purelib = Path(
        run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, dict(os.environ)
        )
        .strip()
        .splitlines()[-1]
    )
    # this environment's packages after the venv's own (so the wheel's segldm comes first)
    (purelib / "reuse_project_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SEGLDM_ROOT", "SEGLDM_FIXTURES")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", wheel], tmp, env)
    work = tmp / "work"  # no checkout beside it
    work.mkdir()
    return {"venv": venv, "purelib": purelib, "work": work, "env": env, "wheel": wheel}


def script(installed, name: str) -> Path:
    path = installed["venv"] / "bin" / name
    assert path.is_file(), f"{name} was not installed as a console script"
    return path


def packaged_conf(installed) -> Path:
    return installed["purelib"] / "segldm" / "conf"


def main_config_source(run_dir: Path) -> str:
    sources = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]["runtime"][
        "config_sources"
    ]
    (main,) = [s for s in sources if s["provider"] == "main"]
    return main["path"]


def test_wheel_carries_the_config_tree_and_the_imports_come_from_it(installed):
    conf = packaged_conf(installed)
    assert (conf / "train.yaml").is_file() and not conf.is_symlink()
    assert sorted(p.name for p in (conf / "experiment").glob("*.yaml")) == sorted(
        p.name for p in (REPO / "conf" / "experiment").glob("*.yaml")
    )
    probe = "import segldm; from segldm.config.locations import config_dir; print(segldm.__file__); print(config_dir())"
    out = run(
        [installed["venv"] / "bin" / "python", "-c", probe], installed["work"], installed["env"]
    ).split()
    assert out[-2] == str(installed["purelib"] / "segldm" / "__init__.py")
    assert out[-1] == str(conf.resolve())


def test_tiny_train_then_sample_with_the_console_scripts(installed):
    work, env = installed["work"], installed["env"]
    run(
        [
            script(installed, "segldm-train"),
            "experiment=quickstart",
            "model.first_stage.ckpt_path=null",
            "model.require_pretrained_first_stage=false",
            *TINY_FIRST_STAGE,
            *TINY_UNET,
            *TINY_DATA,
            *TINY_TRAINER,
            "logger=none",
        ],
        work,
        env,
    )
    run_dir = work / "outputs" / "quickstart" / "ldm"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    assert main_config_source(run_dir) == str(packaged_conf(installed).resolve())

    out_dir = work / "samples"
    run(
        [script(installed, "segldm-sample"), f"ckpt={ckpt}", "masks=val", "num_samples=2", "steps=2"]
        + ["batch_size=2", "device=cpu", f"out_dir={out_dir}"],
        work,
        env,
    )
    assert len(list((out_dir / "samples").glob("*.png"))) == 2 and (out_dir / "grid.png").is_file()
    assert main_config_source(out_dir) == str(packaged_conf(installed).resolve())


def test_user_groups_beside_the_installed_tree(installed):
    work, env = installed["work"], installed["env"]
    mine = work / "myconf" / "data"
    mine.mkdir(parents=True)
    (mine / "mydata.yaml").write_text("defaults:\n  - synthetic\n  - _self_\n\nsize: 40\nn_labels: 5\n")
    show = ["data=mydata", "model.first_stage.ckpt_path=null", "--cfg", "job", "--package", "data"]
    for how in (["--config-dir", str(work / "myconf")], [f"hydra.searchpath=[file://{work / 'myconf'}]"]):
        out = run([script(installed, "segldm-train"), *how, *show], work, env)
        assert "size: 40" in out and "n_labels: 5" in out and "SyntheticScenes" in out, out


def test_every_console_script_starts(installed):
    work, env = installed["work"], installed["env"]
    for name in (
        "segldm-eval",
        "segldm-check",
        "segldm-train-segmenter",
    ):  # Hydra apps: help lists the groups
        out = run([script(installed, name), "--help"], work, env)
        assert "== Configuration groups ==" in out and "data:" in out, (name, out)
    for name in ("segldm-convert", "segldm-report"):
        assert "usage:" in run([script(installed, name), "--help"], work, env).lower()
