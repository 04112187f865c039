"""The ``reference`` section of `make bench`: segldm against the real CompVis latent-diffusion code.

For each configuration: segldm builds the model from its training config with random weights and
exports it as a CompVis config + checkpoint (:func:`segldm.compat.compvis.compvis_config_from_segldm`);
two worker processes load that same pair, segldm's through its CompVis loader and the reference's
through its own ``instantiate_from_config`` (``experiments/bench/compvis_worker.py``, which stubs
the reference's PyTorch Lightning 1.x imports in its process only). Both compute the same latents,
conditioning, UNet output, loss, UNet gradients and DDIM samples from the same inputs; only when
they agree within ``reference.tolerance`` is anything timed. Timing alternates the sides round by
round (the order flips every round) and reports the median over rounds of the per-round ratio.

Needs checkouts of CompVis/latent-diffusion and CompVis/taming-transformers
(``bench.reference_dir=`` or ``SEGLDM_REF_DIR``); without them the section records why it was skipped.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from segldm.compat.compvis import compvis_config_from_segldm
from segldm_bench.building import build_model
from segldm_bench.machine import bf16_supported, load_average
from segldm_bench.measure import compile_cost
from segldm_bench.modes import BatchSource
from segldm_bench.workers import WorkerProcess

log = logging.getLogger(__name__)
MiB = 2**20
LDM_MARKER = Path("ldm/models/diffusion/ddpm.py")
TAMING_MARKER = Path("taming/modules/vqvae/quantize.py")
# segldm's side, a script beside compvis_worker.py: run by path, its folder (which holds this package)
# comes first on its sys.path, so it imports the suite without anything installed
SEGLDM_WORKER = Path(__file__).resolve().parents[1] / "segldm_worker.py"


@dataclass(frozen=True)
class Comparison:
    """One row: the reference's task against segldm's task, timed in the same rounds."""

    reference: str
    segldm: str
    what: str
    bf16: bool = False  # only where the device has native bf16
    memory: bool = False  # also compare peak memory
    eager: str | None = None  # a compiled segldm task: its eager twin (compile time, break-even steps)


COMPARISONS = {
    "unet_fp32": Comparison("unet", "unet_fp32", "UNet alone (forward + L1 + backward), fp32 both", memory=True),
    "unet_bf16": Comparison("unet", "unet_bf16", "UNet alone, segldm under bf16 autocast (reference fp32, as it runs)", bf16=True),
    "step_fp32": Comparison("step", "step_fp32", "whole training step, fp32, the one-hot given to the reference for free", memory=True),
    "step_fp32_loader": Comparison("step_loader_one_hot", "step_fp32", "whole training step, fp32, the reference building its one-hot as its loader does"),
    "step_bf16": Comparison("step", "step_bf16", "whole training step, segldm under bf16 autocast (reference fp32, one-hot free)", bf16=True, memory=True),
    "unet_fp32_channels_last": Comparison("unet", "unet_fp32_channels_last", "UNet alone, fp32, segldm with model.performance.channels_last=true"),
    "unet_bf16_channels_last": Comparison("unet", "unet_bf16_channels_last", "UNet alone, segldm bf16 + model.performance.channels_last=true (reference fp32)", bf16=True),
    "step_fp32_channels_last": Comparison("step", "step_fp32_channels_last", "whole training step, fp32, segldm with model.performance.channels_last=true (one-hot free)", memory=True),
    "step_bf16_channels_last": Comparison("step", "step_bf16_channels_last", "whole training step, segldm bf16 + model.performance.channels_last=true (reference fp32, one-hot free)", bf16=True, memory=True),
    "unet_fp32_compile": Comparison("unet", "unet_fp32_compile", "UNet alone, fp32, segldm with model.performance.compile=true", eager="unet_fp32"),
    "step_fp32_compile": Comparison("step", "step_fp32_compile", "whole training step, fp32, segldm with model.performance.compile=true (one-hot free)", eager="step_fp32"),
    "step_fp32_compile_first_stage": Comparison("step", "step_fp32_compile_first_stage", "whole training step, fp32, segldm with model.performance.compile_first_stage=true (one-hot free)", eager="step_fp32"),
    "step_bf16_compile_first_stage": Comparison("step", "step_bf16_compile_first_stage", "whole training step, segldm bf16 + model.performance.compile_first_stage=true (reference fp32, one-hot free)", bf16=True, eager="step_bf16"),
    "step_fp32_channels_last_compile_first_stage": Comparison("step", "step_fp32_channels_last_compile_first_stage", "whole training step, fp32, segldm with channels_last and compile_first_stage (one-hot free)", eager="step_fp32_channels_last"),
    "step_bf16_channels_last_compile_first_stage": Comparison("step", "step_bf16_channels_last_compile_first_stage", "whole training step, segldm bf16 + channels_last + compile_first_stage (reference fp32, one-hot free)", bf16=True, eager="step_bf16_channels_last"),
    "step_bf16_compile": Comparison("step", "step_bf16_compile", "whole training step, segldm bf16 + model.performance.compile=true (reference fp32, one-hot free)", bf16=True, eager="step_bf16"),
    "ema": Comparison("ema", "ema", "EMA update of the UNet weights (after every optimizer step)"),
    "sample_fp32": Comparison("sample", "sample_fp32", "DDIM sampling (eta 0, EMA weights), UNet evaluations, fp32 both"),
    "sample_bf16": Comparison("sample", "sample_bf16", "DDIM sampling, segldm under bf16 autocast (reference fp32)", bf16=True),
}  # fmt: skip


def locate_reference(reference_dir: str | None) -> tuple[Path, Path]:
    """(latent-diffusion checkout, taming-transformers checkout) under `reference_dir`: the folder
    itself, its subfolders, their ``src/`` (where CompVis's environment installs taming) or siblings."""
    if not reference_dir:
        raise FileNotFoundError(
            "no reference checkout: set bench.reference_dir=DIR or SEGLDM_REF_DIR to a folder holding "
            "git clones of https://github.com/CompVis/latent-diffusion and "
            "https://github.com/CompVis/taming-transformers"
        )
    root = Path(reference_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"bench.reference_dir={reference_dir}: no such folder")
    candidates = [root]
    for base in (root, root / "src", root.parent):
        if base.is_dir():
            candidates += sorted(p for p in base.iterdir() if p.is_dir())
    candidates += [c / "src" / name for c in list(candidates) for name in ("taming-transformers",)]
    ldm = next((c for c in candidates if (c / LDM_MARKER).is_file()), None)
    taming = next((c for c in candidates if (c / TAMING_MARKER).is_file()), None)
    missing = [
        name
        for name, found in (("CompVis/latent-diffusion", ldm), ("CompVis/taming-transformers", taming))
        if not found
    ]
    if missing:
        raise FileNotFoundError(
            f"bench.reference_dir={reference_dir}: no checkout of {' or '.join(missing)} found in it, its "
            f"subfolders, their src/ or its siblings (looked for {LDM_MARKER} and {TAMING_MARKER})"
        )
    assert ldm is not None and taming is not None
    return ldm, taming


def write_setup(name: str, cfg: DictConfig, spec: DictConfig, folder: Path, threads: int) -> dict[str, Any]:
    """The CompVis config + checkpoint of the configuration (random weights, zero layers randomised)
    and the fixed inputs both sides read."""
    model, train_cfg = build_model(list(spec.overrides), torch.device("cpu"), int(cfg.seed))
    generator = torch.Generator().manual_seed(int(cfg.seed))
    if model.use_ema:  # EMA weights unlike the live ones: a side sampling with the wrong set disagrees
        params = dict(model.model.named_parameters())
        shadows = dict(model.model_ema.named_buffers())
        with torch.no_grad():
            for param_name, buffer_name in model.model_ema.m_name2s_name.items():
                noise = torch.randn(params[param_name].shape, generator=generator)
                shadows[buffer_name].copy_(
                    params[param_name] + 0.01 * noise * params[param_name].std().nan_to_num(1.0)
                )
    compvis = compvis_config_from_segldm(
        {k: OmegaConf.to_container(train_cfg[k], resolve=True) for k in ("model", "data", "scheduler")}
    )
    config_path, ckpt_path = folder / f"{name}.yaml", folder / f"{name}.ckpt"
    OmegaConf.save(OmegaConf.create(compvis), config_path)
    torch.save({"state_dict": model.state_dict()}, ckpt_path)
    batch_size = int(spec.batch_size)
    size, n_labels = int(train_cfg.data.size), int(train_cfg.data.n_labels)
    data = BatchSource.make(batch_size, size, n_labels, int(cfg.seed))
    with torch.no_grad():
        latent_shape = model.first_stage_model.encode(data.images[:1].permute(0, 3, 1, 2)).shape[1:]
    setup = {
        "config_path": str(config_path),
        "ckpt_path": str(ckpt_path),
        "threads": threads,
        "n_labels": n_labels,
        "images": data.images,
        "label_maps": data.label_maps,
        "t": torch.randint(0, model.num_timesteps, (batch_size,), generator=generator),
        "noise": torch.randn((batch_size, *latent_shape), generator=generator),
        "x_T": torch.randn((batch_size, *latent_shape), generator=generator),
        "sampler_steps": int(cfg.reference.sampler_steps),
        "tolerance": float(cfg.reference.tolerance),
        "lr": float(cfg.reference.lr),
    }
    torch.save(setup, folder / f"{name}_setup.pt")
    del model
    return {"path": folder / f"{name}_setup.pt", "batch_size": batch_size, "size": size, "n_labels": n_labels}


def relative_error(ours: torch.Tensor, theirs: torch.Tensor, scale: float | None = None) -> float:
    """||ours - theirs|| / ||theirs|| (or / `scale`; inf for a shape mismatch)."""
    if ours.shape != theirs.shape:
        return float("inf")
    denominator = theirs.double().norm() if scale is None else torch.tensor(scale, dtype=torch.float64)
    return float((ours.double() - theirs.double()).norm() / denominator.clamp_min(1e-30))


def gradient_scale(outputs: dict[str, torch.Tensor]) -> float:
    """Norm of all checked gradients together: the scale each gradient's error is measured against.
    Some gradients are zero in exact arithmetic (a per-channel bias right before a GroupNorm with one
    channel per group, e.g. 32 channels in 32 groups) and both sides return rounding noise for them,
    so an error relative to their own norm would be ~1 for two correct implementations."""
    grads = [v.double().norm() ** 2 for k, v in outputs.items() if k.startswith("grad:")]
    return float(torch.stack(grads).sum().sqrt()) if grads else 1.0


def check_equal(ref: WorkerProcess, seg: WorkerProcess, folder: Path, tolerance: float) -> dict[str, float]:
    """Each output's relative error between the sides (gradients: relative to :func:`gradient_scale`);
    raises, naming the tensors, beyond tolerance."""
    theirs = torch.load(
        ref.call("check", out=str(folder / "reference_outputs.pt"))["path"], weights_only=True
    )
    ours = torch.load(seg.call("check", out=str(folder / "segldm_outputs.pt"))["path"], weights_only=True)
    if set(ours) != set(theirs):
        raise ValueError(
            f"the sides computed different outputs: segldm {sorted(ours)}, reference {sorted(theirs)}"
        )
    scale = gradient_scale(theirs)
    errors = {
        k: relative_error(ours[k], theirs[k], scale if k.startswith("grad:") else None)
        for k in sorted(theirs)
    }
    bad = {k: v for k, v in errors.items() if not v <= tolerance}
    if bad:
        raise ValueError(
            f"segldm and the reference disagree beyond bench.reference.tolerance={tolerance} (relative L2 "
            f"error) in {bad}; nothing was timed. Outputs: {folder}"
        )
    return errors


def wanted_comparisons(name: str, cfg: DictConfig, bf16: bool) -> list[str]:
    """The comparisons of `reference.configs.<name>` this run times (bf16 rows where native, compiled
    rows with `compile=true`); raises on an unknown one or a compiled row without its eager twin."""
    spec = cfg.reference.configs[name]
    unknown = sorted(set(spec.comparisons) - set(COMPARISONS))
    if unknown:
        raise ValueError(
            f"reference.configs.{name}.comparisons: unknown {unknown}; known: {sorted(COMPARISONS)}"
        )
    wanted = [
        c
        for c in spec.comparisons
        if (bf16 or not COMPARISONS[c].bf16) and (cfg.compile or COMPARISONS[c].eager is None)
    ]
    timed = {COMPARISONS[c].segldm for c in wanted}
    missing_eager = sorted(
        f"{c} needs {COMPARISONS[c].eager}" for c in wanted if COMPARISONS[c].eager not in (None, *timed)
    )
    if missing_eager:
        raise ValueError(
            f"reference.configs.{name}.comparisons: a compiled row is compared with its eager twin, "
            f"add it: {missing_eager}"
        )
    return wanted


def bench_reference_config(
    name: str, cfg: DictConfig, ldm: Path, taming: Path, worker_script: Path
) -> dict[str, Any]:
    spec = cfg.reference.configs[name]
    threads = int(cfg.threads or torch.get_num_threads())
    bf16 = bf16_supported(torch.device("cpu"))
    wanted = wanted_comparisons(name, cfg, bf16)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"segldm-bench-ref-{name}-") as tmp:
        folder = Path(tmp)
        setup = write_setup(name, cfg, spec, folder, threads)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
        log_dir = Path(str(cfg.reference.log_dir))
        log_dir.mkdir(parents=True, exist_ok=True)
        ref = WorkerProcess(
            "reference",
            [sys.executable, str(worker_script), str(setup["path"]), str(ldm), str(taming)],
            log_dir / f"{name}_reference.log", env,
        )  # fmt: skip
        seg = WorkerProcess(
            "segldm",
            [sys.executable, str(SEGLDM_WORKER), str(setup["path"])],
            log_dir / f"{name}_segldm.log", env,
        )  # fmt: skip
        try:
            errors = check_equal(ref, seg, folder, float(cfg.reference.tolerance))
            log.info(
                "bench reference %s: outputs agree (max relative error %.2e)", name, max(errors.values())
            )
            timing, first_calls, load = time_alternating(
                ref, seg, [COMPARISONS[c] for c in wanted], int(spec.rounds)
            )
            compile_errors = seg.call("compile_checks")["relative_errors"]
            peaks = peak_mib_per_task(ref, seg, [COMPARISONS[c] for c in wanted if COMPARISONS[c].memory])
            memory = {
                c: {
                    "reference_mib": peaks["reference"][COMPARISONS[c].reference],
                    "segldm_mib": peaks["segldm"][COMPARISONS[c].segldm],
                }
                for c in wanted
                if COMPARISONS[c].memory
            }
            profiles = {
                c: {
                    "reference": ref.call("profile", task=COMPARISONS[c].reference)["seconds_by_kind"],
                    "segldm": seg.call("profile", task=COMPARISONS[c].segldm)["seconds_by_kind"],
                }
                for c in wanted
                if c in ("unet_fp32", "step_fp32")
            }
            infos = {"reference": ref.info, "segldm": seg.info}
        finally:
            ref.close()
            seg.close()
    rows = {}
    for c in wanted:
        comparison = COMPARISONS[c]
        theirs, ours = timing["reference"][comparison.reference], timing["segldm"][comparison.segldm]
        row = {
            "what": comparison.what,
            "reference_task": comparison.reference,
            "segldm_task": comparison.segldm,
            "reference_s": statistics.median(theirs),
            "segldm_s": statistics.median(ours),
            "speedup": statistics.median(t / o for t, o in zip(theirs, ours, strict=True)),
            "reference_rounds_s": [round(v, 4) for v in theirs],
            "segldm_rounds_s": [round(v, 4) for v in ours],
        }
        if c in memory:
            row.update(memory[c], memory_ratio=memory[c]["segldm_mib"] / memory[c]["reference_mib"])
        if comparison.eager is not None:
            row.update(
                compile_cost(
                    first_calls["segldm"][comparison.segldm], ours, timing["segldm"][comparison.eager]
                ),
                compiled_vs_eager_relative_error=compile_errors.get(comparison.segldm),
            )
        if c == "ema" and "step_fp32" in wanted:  # the budget: <= 5 % of the step
            step = timing["segldm"]["step_fp32"]
            row["segldm_share_of_step_fp32"] = statistics.median(
                e / s for e, s in zip(ours, step, strict=True)
            )
        if comparison.reference == "sample":
            evals = int(cfg.reference.sampler_steps) * setup["batch_size"]
            row.update(
                reference_unet_evals_per_s=evals / row["reference_s"],
                segldm_unet_evals_per_s=evals / row["segldm_s"],
            )
        rows[c] = row
    return {
        "description": str(spec.description),
        "overrides": list(spec.overrides),
        "batch_size": setup["batch_size"],
        "data_shape": {"size": setup["size"], "n_labels": setup["n_labels"]},
        "threads": threads,
        "workers": infos,
        "check": {"tolerance": float(cfg.reference.tolerance), "relative_errors": errors},
        "rounds": int(spec.rounds),
        "load_during_rounds": load,
        "comparisons": rows,
        "profiles": profiles,
        "wall_s": time.perf_counter() - started,
    }


def peak_mib_per_task(
    ref: WorkerProcess, seg: WorkerProcess, comparisons: list[Comparison]
) -> dict[str, dict[str, float]]:
    """Peak MiB of each task the comparisons name, measured once per task (several rows share the
    reference's `step`)."""
    workers = {"reference": ref, "segldm": seg}
    tasks = {
        "reference": dict.fromkeys(c.reference for c in comparisons),
        "segldm": dict.fromkeys(c.segldm for c in comparisons),
    }
    return {
        side: {t: workers[side].call("memory", task=t)["peak_bytes"] / MiB for t in names}
        for side, names in tasks.items()
    }


def time_alternating(
    ref: WorkerProcess, seg: WorkerProcess, comparisons: list[Comparison], rounds: int
) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, float]], list[Any]]:
    """Seconds per call of every task the comparisons need, one call per task per round; the sides
    take turns, the reference first in even rounds and segldm first in odd ones. Also each task's
    untimed first call (what compiling costs)."""
    tasks = {
        "reference": list(dict.fromkeys(c.reference for c in comparisons)),
        "segldm": list(dict.fromkeys(c.segldm for c in comparisons)),
    }
    workers = {"reference": ref, "segldm": seg}
    seconds: dict[str, dict[str, list[float]]] = {side: {t: [] for t in ts} for side, ts in tasks.items()}
    first_calls: dict[str, dict[str, float]] = {side: {} for side in tasks}
    for side, names in tasks.items():  # warm-up, untimed: kernels, allocator, optimizer state
        for task in names:
            first_calls[side][task] = workers[side].call("time", task=task)["first_call_s"]
    load = []
    for r in range(rounds):
        load.append(load_average())
        order = ["reference", "segldm"] if r % 2 == 0 else ["segldm", "reference"]
        for side in order:
            for task in tasks[side]:
                seconds[side][task].append(workers[side].call("time", task=task)["seconds"])
        log.info("bench reference: round %d/%d done", r + 1, rounds)
    load.append(load_average())
    return seconds, first_calls, load


def bench_reference(cfg: DictConfig) -> dict[str, Any]:
    """The section: every configured comparison, or why it was skipped (no checkouts)."""
    try:
        ldm, taming = locate_reference(cfg.reference_dir)
    except FileNotFoundError as err:
        log.warning("bench reference: skipped: %s", err)
        return {"skipped": str(err)}
    worker_script = Path(str(cfg.reference.worker))
    if not worker_script.is_file():
        raise FileNotFoundError(
            f"bench.reference.worker={worker_script}: the reference-side worker script is missing"
        )
    for name in cfg.reference.configs:  # every config's list checked before the first one runs for minutes
        wanted_comparisons(name, cfg, bf16_supported(torch.device("cpu")))
    out: dict[str, Any] = {"latent_diffusion": str(ldm), "taming_transformers": str(taming), "configs": {}}
    for name in cfg.reference.configs:
        out["configs"][name] = bench_reference_config(name, cfg, ldm, taming, worker_script)
    out["goals"] = check_reference_goals(out["configs"], cfg.reference.get("goals") or [])
    return out


def check_reference_goals(configs: dict[str, Any], goals: Any) -> list[dict[str, Any]]:
    """Each goal of `reference.goals` read off this run: with segldm's defaults (`comparison`) and with
    the best of the opt-in settings listed in `opt_in` (None where a row was not measured, e.g. bf16
    rows on a CPU without native bf16)."""
    out = []
    for goal in goals:
        rows = configs.get(goal.config, {}).get("comparisons", {})
        at_least = "at_least" in goal
        bound = float(goal.at_least if at_least else goal.at_most)

        def meets(value: float | None, at_least: bool = at_least, bound: float = bound) -> bool | None:
            return None if value is None else (value >= bound if at_least else value <= bound)

        value = rows.get(goal.comparison, {}).get(goal.metric)
        entry: dict[str, Any] = {
            "config": goal.config,
            "comparison": goal.comparison,
            "metric": goal.metric,
            "goal": f"{'>=' if at_least else '<='} {bound:g}",
            "value": value,
            "met": meets(value),
        }
        measured = {
            c: rows[c][goal.metric] for c in goal.get("opt_in") or [] if goal.metric in rows.get(c, {})
        }
        if measured:
            best = (max if at_least else min)(measured, key=measured.__getitem__)
            entry.update(
                best_opt_in=best, best_opt_in_value=measured[best], best_opt_in_met=meets(measured[best])
            )
        out.append(entry)
    return out
