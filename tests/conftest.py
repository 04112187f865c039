"""Shared helpers: compose the real config, run the real entry point in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import segldm  # noqa: F401  (resolvers)

# The test models are tiny: one thread is as fast and does not collapse when the two cores are shared.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# A CPU-sized two-stage setup: 32px scenes, the smallest VQ-f4 and UNet GroupNorm32 allows.
TINY_DATA = [
    "data.size=32",
    "data.batch_size=4",
    "data.train.length=32",
    "data.validation.length=4",
]
TINY_FIRST_STAGE = [
    "model/first_stage=vq_f4_small",
    "model.first_stage.ddconfig.ch_mult=[1,1,1]",
    "model.first_stage.n_embed=32",
]
TINY_UNET = [
    "model.unet.model_channels=32",
    "model.unet.channel_mult=[1,1]",
    "model.unet.num_res_blocks=1",
    "model.unet.attention_resolutions=[2]",
    "model.unet.num_heads=2",
]
TINY_TRAINER = [
    "trainer=cpu",
    "trainer.precision=32-true",  # tests assert fp32 arithmetic on every CPU (auto picks bf16 where native)
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "callbacks.sample_grid.every_n_steps=0",
    "callbacks.sample_grid.num_samples=2",
    "callbacks.sample_grid.ddim_steps=5",
]


def compose_train(overrides: list[str] | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides or [])


def run_train(
    args: list[str], root: Path, timeout: int = 300, check: bool = True, threads: int = 1
) -> subprocess.CompletedProcess:
    """`python -m segldm.train <args>` with every path under `root` (one thread unless told)."""
    env = {**os.environ, "SEGLDM_ROOT": str(root), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(
        [sys.executable, "-m", "segldm.train", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"segldm.train {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


# ------------------------------------------------------------------------------------ CI: no silent skips
def on_ci() -> bool:
    """CI sets CI=true (as GitHub Actions, GitLab and most runners do)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing_reference_fixtures() -> list[str]:
    """What the CompVis and DeepLab parity tests need from ../shared/fixtures and cannot find."""
    from tests.compvis_fixtures import fixtures_dir, model_fixture_dirs

    needs = {
        "a CompVis model fixture (compvis/<name>/{io.pt,model.ckpt,config.yaml})": bool(model_fixture_dirs()),
        str(fixtures_dir() / "data" / "files"): (fixtures_dir() / "data" / "files").is_dir(),
        str(REPO.parent / "shared/fixtures/deeplabv2_cocostuff/io.pt"): (
            REPO.parent / "shared/fixtures/deeplabv2_cocostuff/io.pt"
        ).is_file(),
    }
    return [what for what, present in needs.items() if not present]


def pytest_sessionstart(session: pytest.Session) -> None:
    """On CI the reference fixtures are part of the test input: without them the run fails, up front."""
    missing = missing_reference_fixtures() if on_ci() else []
    if missing:
        raise pytest.UsageError(
            "CI=true but the reference fixtures are missing: " + "; ".join(missing) + ". CI must run the "
            "CompVis/DeepLab parity tests: put a copy of shared/ beside the clone (or set SEGLDM_FIXTURES)"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """On CI a skipped test is a failure: what the README claims must have been run."""
    outcome = yield
    report = outcome.get_result()
    if on_ci() and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped on CI (CI=true), which must run every test: {reason}"
