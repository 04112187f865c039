"""`make bench`'s section against the real CompVis code: finding the checkouts, the worker protocol,
segldm's side of it, and the equality check that gates all timing (toy sizes; no reference checkout
is needed except for the last test, `make test-reference`, run where SEGLDM_REF_DIR points at them)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from segldm_bench.reference import (
    COMPARISONS,
    SEGLDM_WORKER,
    bench_reference,
    bench_reference_config,
    check_equal,
    locate_reference,
    relative_error,
    wanted_comparisons,
    write_setup,
)
from segldm_bench.workers import KERNEL_KINDS, WorkerError, WorkerProcess, kernel_kind
from tests.bench.test_bench import TOY

REPO = Path(__file__).resolve().parents[2]


def checkout(root: Path, marker: str) -> Path:
    (root / marker).parent.mkdir(parents=True)
    (root / marker).write_text("")
    return root


def test_locate_reference_layouts(tmp_path):
    ldm = checkout(tmp_path / "a" / "latent-diffusion", "ldm/models/diffusion/ddpm.py")
    taming = checkout(tmp_path / "a" / "taming-transformers", "taming/modules/vqvae/quantize.py")
    assert locate_reference(str(tmp_path / "a")) == (ldm, taming)  # a folder holding both
    assert locate_reference(str(ldm)) == (ldm, taming)  # one checkout, the other beside it
    src = checkout(tmp_path / "b" / "src" / "taming-transformers", "taming/modules/vqvae/quantize.py")
    ldm_b = checkout(tmp_path / "b", "ldm/models/diffusion/ddpm.py")
    assert locate_reference(str(ldm_b)) == (ldm_b, src)  # CompVis's environment: pip -e into src/


def test_missing_checkouts_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="SEGLDM_REF_DIR.*CompVis/latent-diffusion"):
        locate_reference(None)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        locate_reference(str(tmp_path / "nowhere"))
    checkout(tmp_path / "only" / "latent-diffusion", "ldm/models/diffusion/ddpm.py")
    with pytest.raises(FileNotFoundError, match="no checkout of CompVis/taming-transformers found"):
        locate_reference(str(tmp_path / "only"))
    section = bench_reference(OmegaConf.create({"reference_dir": None}))
    assert set(section) == {"skipped"} and "bench.reference_dir" in section["skipped"]


def test_relative_error():
    a = torch.tensor([3.0, 4.0])
    assert relative_error(a, a) == 0.0
    assert relative_error(a + torch.tensor([0.0, 0.5]), a) == pytest.approx(0.1)
    assert relative_error(a[:1], a) == float("inf")


def test_kernel_kinds():
    kinds = {
        "aten::mkldnn_convolution": "convolution",
        "aten::convolution_backward": "convolution",
        "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
        "aten::bmm": "attention",
        "aten::_softmax": "attention",
        "aten::addmm": "matmul",
        "aten::native_group_norm_backward": "normalization",
        "aten::silu": "other",
    }
    assert {op: kernel_kind(op) for op in kinds} == kinds


def test_worker_that_dies_reports_its_log(tmp_path):
    script = "import sys; print('reference import failed: no module ldm', file=sys.stderr); sys.exit(3)"
    with pytest.raises(WorkerError, match=r"(?s)exited \(code 3\).*no module ldm"):
        WorkerProcess("reference", [sys.executable, "-c", script], tmp_path / "w.log")


@pytest.fixture(scope="module")
def toy_setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("setup")
    cfg = OmegaConf.create({"seed": 0, "reference": {"sampler_steps": 2, "lr": 1e-7, "tolerance": 1e-4}})
    spec = OmegaConf.create({"overrides": TOY, "batch_size": 2})
    return write_setup("toy", cfg, spec, folder, threads=1)


def segldm_worker(setup: dict, log: Path) -> WorkerProcess:
    argv = [sys.executable, str(SEGLDM_WORKER), str(setup["path"])]
    return WorkerProcess("segldm", argv, log, {**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.timeout(300)
def test_segldm_side_serves_every_task_and_checks_gate_timing(toy_setup, tmp_path):
    one, two = segldm_worker(toy_setup, tmp_path / "1.log"), segldm_worker(toy_setup, tmp_path / "2.log")
    try:
        assert set(one.info["tasks"]) >= {c.segldm for c in COMPARISONS.values()}
        assert one.info["threads"] == 1
        # the same code on the same checkpoint and inputs: every output agrees exactly
        errors = check_equal(one, two, tmp_path, tolerance=0.0)
        assert set(errors) >= {"latent", "conditioning", "unet_output", "loss", "ddim_samples"}
        assert any(k.startswith("grad:") for k in errors) and max(errors.values()) == 0.0
        with pytest.raises(
            ValueError, match=r"disagree beyond .*tolerance=-1.0.*'latent'.*nothing was timed"
        ):
            check_equal(one, two, tmp_path, tolerance=-1.0)
        for task in ("unet_fp32", "step_fp32", "step_fp32_channels_last", "step_fp32", "sample_fp32"):
            assert one.call("time", task=task)["seconds"] > 0
        profile = one.call("profile", task="unet_fp32")["seconds_by_kind"]
        assert set(profile) == set(KERNEL_KINDS) and profile["convolution"] > 0
        memory = one.call("memory", task="step_fp32")
        assert memory["peak_bytes"] > memory["resident_bytes"] > 0  # weights + EMA + AdamW state
        with pytest.raises(WorkerError, match="unknown task 'nope'"):
            one.call("time", task="nope")
        assert one.call("info")["side"] == "segldm"  # a failed command leaves the worker serving
    finally:
        one.close()
        two.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compiled_task_compiles_apart_and_is_checked_against_eager(toy_setup, tmp_path):
    """torch.compile'd UNet: the first call compiles (timed apart, ~1 min at toy size on 2 cores),
    then its output is compared with the eager UNet's before any of it is timed."""
    worker = segldm_worker(toy_setup, tmp_path / "w.log")
    try:
        compiled = worker.call("time", task="unet_fp32_compile")
        assert compiled["first_call_s"] > compiled["seconds"] > 0
        assert worker.call("compile_checks")["relative_errors"]["unet_fp32_compile"] <= 1e-4
    finally:
        worker.close()


@pytest.mark.reference
@pytest.mark.timeout(600)
def test_against_the_real_reference_at_toy_size(tmp_path):
    """`make test-reference` (deselected elsewhere: CI has no checkouts and no network to get them)."""
    if not os.environ.get("SEGLDM_REF_DIR"):
        pytest.fail(
            "set SEGLDM_REF_DIR to a folder with checkouts of CompVis/latent-diffusion and taming-transformers"
        )
    cfg = OmegaConf.create(
        {
            "seed": 0,
            "threads": 1,
            "compile": True,
            "reference": {
                "sampler_steps": 2,
                "lr": 1e-7,
                "tolerance": 1e-4,
                "log_dir": str(tmp_path),
                "configs": {
                    "toy": {
                        "description": "toy",
                        "batch_size": 2,
                        "rounds": 1,
                        "overrides": TOY,
                        "comparisons": list(COMPARISONS),
                    }
                },
            },
        }
    )
    ldm, taming = locate_reference(os.environ["SEGLDM_REF_DIR"])
    result = bench_reference_config("toy", cfg, ldm, taming, REPO / "experiments/bench/compvis_worker.py")
    assert max(result["check"]["relative_errors"].values()) <= 1e-4
    assert all(row["speedup"] > 0 for row in result["comparisons"].values())
    compiled = result["comparisons"]["unet_fp32_compile"]
    assert compiled["compile_s"] > 0 and compiled["compiled_vs_eager_relative_error"] <= 1e-4


def test_comparison_lists_are_checked_before_anything_runs():
    def cfg(comparisons, compile_rows=True):
        return OmegaConf.create(
            {"compile": compile_rows, "reference": {"configs": {"toy": {"comparisons": comparisons}}}}
        )

    with pytest.raises(ValueError, match=r"unknown \['nope'\]"):
        wanted_comparisons("toy", cfg(["unet_fp32", "nope"]), bf16=True)
    with pytest.raises(ValueError, match=r"eager twin, add it: \['unet_fp32_compile needs unet_fp32'\]"):
        wanted_comparisons("toy", cfg(["unet_fp32_compile"]), bf16=True)
    both = ["unet_fp32", "unet_fp32_compile", "unet_bf16"]
    assert wanted_comparisons("toy", cfg(both), bf16=True) == both
    assert wanted_comparisons("toy", cfg(both, compile_rows=False), bf16=False) == ["unet_fp32"]
