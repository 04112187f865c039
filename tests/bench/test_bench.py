"""The benchmark suite's measuring tools and its entry point (at toy sizes: this checks the suite,
it does not benchmark anything)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from segldm_bench.machine import CPU_FLAGS, describe_machine, gpu_bf16_peak_tflops
from segldm_bench.measure import Run, Timing, compile_cost, interleave, peak_memory, tensor_bytes
from segldm_bench.modes import ABLATIONS, ANCHOR, variant_modes
from segldm_bench.report import compile_note
from segldm_bench.suite import compiled_row, merge_previous
from tests.conftest import CONF, REPO, compose_train

MiB = 2**20
BENCH = REPO / "experiments" / "bench" / "run.py"  # what make bench runs
TOY = [
    "model/first_stage=vq_f4_small",
    "model.first_stage.ddconfig.ch_mult=[1,1,1]",
    "data.size=32",
    "data.n_labels=182",
    "model.unet.model_channels=32",
    "model.unet.channel_mult=[1,1]",
    "model.unet.num_res_blocks=1",
    "model.unet.attention_resolutions=[2]",
    "model.unet.num_heads=2",
]


def test_ratios_are_taken_round_by_round():
    timing = Timing(
        seconds={"baseline": [2.0, 4.0, 8.0], "fast": [1.0, 1.0, 4.0]}, items={"baseline": 4, "fast": 4}
    )
    assert timing.ratio("baseline", "fast") == 2.0  # rounds give 2, 4, 2: the load of round 2 cancels
    summary = timing.summary("baseline")
    assert summary["fast"]["median_s"] == 1.0 and summary["fast"]["items_per_s"] == 4.0
    assert summary["baseline"]["speedup"] == 1.0 and summary["fast"]["speedup"] == 2.0


def test_compile_cost_is_the_first_call_beyond_a_steady_one():
    # compiled: first call 31 s, then 1 s; eager 1.5 s: 30 s of compiling, 0.5 s saved per call
    cost = compile_cost(31.0, [1.0, 1.2, 0.9], [1.5, 1.8, 1.35])
    assert cost["compile_s"] == 30.0 and cost["break_even_steps"] == 60.0
    assert cost["speedup_vs_eager"] == 1.5
    slower = compile_cost(31.0, [2.0, 2.0, 2.0], [1.5, 1.5, 1.5])
    assert slower["break_even_steps"] is None and slower["speedup_vs_eager"] == 0.75


def test_interleave_times_the_first_call_apart():
    calls = []

    def work() -> None:
        calls.append(1)

    timing = interleave(
        {"a": Run(work, warmup=1), "b": Run(work)}, rounds=2, device=torch.device("cpu"), warmup=0
    )
    assert len(calls) == 5 and set(timing.first_call_s) == {"a"}  # a: 1 warm-up + 2 rounds, b: 2 rounds
    assert timing.summary()["a"]["first_call_s"] >= 0.0 and "first_call_s" not in timing.summary()["b"]


def test_cpu_peak_memory_follows_allocations_and_frees():
    def work() -> None:
        a = torch.ones(1024, 1024)  # 4 MiB
        b = torch.ones(512, 1024)  # 2 MiB: 6 MiB live
        del a
        c = torch.ones(256, 1024)  # 1 MiB: 3 MiB live
        del b, c

    result = peak_memory(work, torch.device("cpu"), resident=10 * MiB)
    assert 16 * MiB <= result["peak_bytes"] < 16 * MiB + 64 * 1024
    assert result["resident_bytes"] == 10 * MiB


def test_shared_storages_count_once():
    x = torch.zeros(1000)
    assert tensor_bytes([x, x[10:], x.view(10, 100)]) == 4000


def test_gpu_peaks_and_machine_description():
    assert gpu_bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert gpu_bf16_peak_tflops("NVIDIA H100 PCIe") == 756.5
    assert gpu_bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_bf16_peak_tflops("Some Future Card") is None
    info = describe_machine(torch.device("cpu"))
    assert info["logical_cores"] and info["torch"] == torch.__version__
    assert set(info["cpu_flags"]) == set(CPU_FLAGS)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # Linux: each reported flag is what the kernel says this CPU has
        flags = set()
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags |= set(line.split(":", 1)[1].split())
        kernel_names = {"avx512_f": "avx512f"}
        assert info["cpu_flags"] == {f: kernel_names.get(f, f) in flags for f in CPU_FLAGS}
        assert info["cpu_native_bf16"] == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_every_mode_is_a_training_config():
    """The overrides a mode reports select that mode in `python -m segldm.train`."""
    for device in ("cpu", "cuda"):
        for name, mode in variant_modes(torch.device(device), bf16=True, channels_last=True).items():
            cfg = compose_train([*mode.config_overrides(device), "paths.output_dir=/tmp/unused"])
            m = cfg.model
            assert m.unet.get("attention_impl", "sdpa") == mode.attention, name
            assert m.first_stage.ddconfig.get("attention_impl", "sdpa") == mode.attention, name
            assert (cfg.trainer.precision == "bf16-mixed") == (mode.precision == "bf16"), name
            perf = m.performance
            assert perf.channels_last == mode.channels_last and perf.compile == mode.compile, name
            assert perf.first_stage_inference_mode == mode.first_stage_inference_mode, name
            assert cfg.data.one_hot_in_loader == (mode.masks == "loader_one_hot"), name
            assert perf.fused_label_conditioning == (mode.masks != "device_one_hot"), name
            assert perf.cache_latents == mode.cached_latents, name
            assert (m.optimization.optimizer.fused is not False) == mode.fused_optimizer, name
    modes = variant_modes(torch.device("cpu"), bf16=True, channels_last=False)
    assert modes[ANCHOR].config_overrides() == ["trainer.precision=32-true"]
    anchor = dataclasses.asdict(modes[ANCHOR])
    for name in ABLATIONS:  # leave-one-out: each differs from the anchor in exactly one choice
        assert len(dataclasses.asdict(modes[name]).items() - anchor.items()) == 1, name
    assert modes["-label_map"].config_overrides() == [
        "trainer.precision=32-true",
        "data.one_hot_in_loader=true",
    ]


def test_bench_defaults_compose():
    cfg = OmegaConf.load(CONF / "bench.yaml")
    for name in ("small", "seed"):
        compose_train([*cfg.configs[name].overrides, "paths.output_dir=/tmp/unused"])
    assert set(cfg.configs.small.variants) <= set(variant_modes(torch.device("cpu"), True, False))


@pytest.mark.timeout(120)
def test_make_bench_writes_results_at_toy_size(tmp_path):
    overrides = "[" + ",".join(f"'{o}'" for o in TOY) + "]"
    args = [
        f"out_dir={tmp_path}",
        "rounds=1",
        "threads=1",
        "sections=[train,first_stage,sampler,data]",
        f"configs.small.overrides={overrides}",
        "configs.small.batch_size=2",
        "configs.small.variants=[-label_map,optimised,optimised+cached_latents,optimised+compile]",
        "compile=false",
        "train.configs=[small]",
        "first_stage.configs=[small]",
        "sampler.configs=[small]",
        "sampler.steps=2",
        "data.samples=4",
        "data.batch_size=2",
        "data.rounds=1",
        f"hydra.run.dir={tmp_path}/run",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(BENCH), *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    train = results["sections"]["train"]["small"]["variants"]
    assert list(train) == [ANCHOR, "-label_map", "optimised", "optimised+cached_latents"]  # compile=false
    assert train[ANCHOR]["speedup"] == 1.0 and train[ANCHOR]["memory_ratio"] == 1.0
    # memory is deterministic: with the loader's one-hot (2 x 32 x 32 x 182 floats, plus the
    # model's channels-first copy) the step's peak rises by at least that much
    one_hot_mib = 2 * 32 * 32 * 182 * 4 / MiB
    assert train["-label_map"]["peak_memory_mib"] > train[ANCHOR]["peak_memory_mib"] + one_hot_mib
    assert results["sections"]["first_stage"]["small"]["bf16_codebook_indices_equal"] is True
    assert set(results["sections"]["data"]["variants"]) == {
        "loader_one_hot",
        "label_map",
        "loader_one_hot+cond_input",
        "label_map+cond_input",
    }
    table = (tmp_path / "results.md").read_text()
    for heading in ("## Training step: `small`", "## First stage", "## Sampler", "## Data loading"):
        assert heading in table
    assert "| optimised+cached_latents |" in table and results["machine"]["torch_threads"] == 1
    # merge=true reruns one section and keeps the others, saying when each was measured
    rerun = subprocess.run(
        [sys.executable, str(BENCH), *[a for a in args if not a.startswith("sections=")],
         "sections=[data]", "merge=true"],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    merged = json.loads((tmp_path / "results.json").read_text())
    assert set(merged["sections"]) == {"train", "first_stage", "sampler", "data"}
    assert merged["sections"]["train"] == results["sections"]["train"]
    assert set(merged["measured_at"]) == set(merged["sections"])


def test_compile_notes_say_what_was_measured():
    assert compile_note({}) == ""
    row = {"compile_s": 30.0, "speedup_vs_eager": 1.5, "break_even_steps": 60.0}
    assert compile_note(row) == " (compiling 30 s, 1.50x the eager twin, pays back after 60 calls)"
    assert "never pays back" in compile_note({**row, "break_even_steps": None})
    earlier = {"compile_s": None, "speedup_vs_eager": 1.2, "break_even_steps": None, "compiled_earlier": True}
    assert compile_note(earlier) == " (compiled by an earlier section of this run, 1.20x the eager twin)"


def test_a_module_compiled_by_an_earlier_section_reports_no_compile_time():
    timing = Timing(
        seconds={"eager": [2.0, 2.0], "compiled": [1.0, 1.0]},
        items={"eager": 1, "compiled": 1},
        first_call_s={"compiled": 41.0},
    )
    fresh = compiled_row(timing, "compiled", ["eager"])
    assert fresh["compile_s"] == 40.0 and fresh["break_even_steps"] == 40.0
    earlier = compiled_row(timing, "compiled", ["eager"], compiled_earlier=True)
    assert earlier["compile_s"] is None and earlier["break_even_steps"] is None
    assert earlier["speedup_vs_eager"] == 2.0


def test_merge_refuses_results_from_another_machine(tmp_path):
    machine = describe_machine(torch.device("cpu"))
    previous = {"machine": {**machine, "cpu": "Another CPU"}, "sections": {"train": {}}}
    (tmp_path / "results.json").write_text(json.dumps(previous))
    fresh = {"machine": machine, "sections": {}, "measured_at": {}}
    with pytest.raises(ValueError, match="cpu='Another CPU'.*rerun every section"):
        merge_previous(fresh, tmp_path / "results.json", ["data"])
    with pytest.raises(FileNotFoundError, match="no .*nowhere.json to merge into"):
        merge_previous(fresh, tmp_path / "nowhere.json", ["data"])
