"""Fault injection: kill a training run at random moments, restart it, compare with an uninterrupted run.

    python experiments/faults/run_faults.py [--kills 6] [--seed 0] [--steps 24]      (make faults)

1. A reference run of a tiny CPU config (`python -m segldm.train`, deterministic) trains --steps
   steps without interruption.
2. The same command with `resume=auto` is started, and killed --kills times, each time with one
   fault drawn at random: SIGKILL during start-up (before the first step), SIGKILL at a random moment
   after a randomly drawn step, SIGKILL while a checkpoint is being written (as soon as a temporary
   checkpoint file exists after that step), or SIGTERM after that step (the graceful pre-emption
   path). After each kill the same command is started again; after the last one it runs to the end.
3. The final checkpoints must be identical (every tensor of the state_dict, optimizer moments,
   LR scheduler, data position) and the single MLflow run of the killed command must hold, at every
   step, exactly the reference's values.
4. Every restarted process must have continued from the checkpoint it names ("resume=auto: <ckpt>
   (global step N)"): a process that ignored it and trained again from step 0 would end the same and
   log the same values, so step 3 cannot tell. MLflow stores each metric value with the wall-clock
   time it was logged at; the values one process logged (between its start and the next one's) must
   begin at step N (the first train/loss) and hold nothing below N, except the step metrics the
   checkpoint carries (written before Lightning logged them; segldm's TrainingState logs them on
   resuming when the store lacks them).

Writes a JSON summary (--json) and experiments/faults/results.md (unless --no-results-md).
Exit status 0 when everything matched.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning
import torch
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

# The CPU-sized setup of tests/conftest.py (TINY_*): 32 px scenes, 8 batches of 4 per epoch.
TINY = [
    "model=ldm_seg",
    "model/first_stage=vq_f4_small",
    "model.first_stage.ddconfig.ch_mult=[1,1,1]",
    "model.first_stage.n_embed=32",
    "model.first_stage.ckpt_path=null",
    "model.require_pretrained_first_stage=false",
    "model.unet.model_channels=32",
    "model.unet.channel_mult=[1,1]",
    "model.unet.num_res_blocks=1",
    "model.unet.attention_resolutions=[2]",
    "model.unet.num_heads=2",
    "model.optimization.base_learning_rate=1e-4",
    "scheduler.warm_up_steps=[4]",
    "data.size=32",
    "data.batch_size=4",
    "data.train.length=32",
    "data.validation.length=4",
    "trainer=cpu",
    "trainer.deterministic=true",
    "trainer.val_check_interval=3",  # validation every 3 steps, checkpoints every 2: both save paths
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "callbacks.sample_grid.every_n_steps=0",
    "callbacks.sample_grid.num_samples=2",
    "callbacks.sample_grid.ddim_steps=5",
    "callbacks.progress_bar=null",
]
FAULTS = ("sigkill-at-startup", "sigkill", "sigkill-during-save", "sigterm")
RESUMED = re.compile(r"resume=auto: (\S+) \(global step (\d+)\)")


def start(args: list[str], root: Path, started: list[int] | None = None) -> subprocess.Popen:
    """``python -m segldm.train <args>``; appends its start time (ms, MLflow's clock) to ``started``."""
    if started is not None:
        started.append(int(time.time() * 1000))
    env = {**os.environ, "SEGLDM_ROOT": str(root), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "segldm.train", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    out = proc.communicate(timeout=timeout)[0]
    if proc.returncode != 0:
        raise RuntimeError(f"segldm.train failed ({proc.returncode}):\n{out[-5000:]}")
    return out


def complete_steps(folder: Path) -> list[int]:
    """global_step of every complete checkpoint of a run folder (temporary files are not checkpoints)."""
    steps = []
    for path in [*folder.glob("checkpoints/*.ckpt"), *folder.glob("hpc_ckpt_*.ckpt")]:
        steps.append(int(torch.load(path, map_location="cpu", weights_only=True)["global_step"]))
    return sorted(steps)


def checkpoint_record(folder: Path) -> dict[str, dict[str, Any]]:
    """{path: global step, and the (metric, step) pairs of step metrics it carries} of every complete
    checkpoint of a run folder: read before a process starts, which may overwrite last.ckpt."""
    record = {}
    for path in [*folder.glob("checkpoints/*.ckpt"), *folder.glob("hpc_ckpt_*.ckpt")]:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        state = (ckpt.get("callbacks") or {}).get("TrainingState") or {}
        pending = state.get("unlogged_metrics") or {}
        carried = sorted((k, int(pending["step"])) for k in pending.get("metrics", {}))
        record[str(path.resolve())] = {"global_step": int(ckpt["global_step"]), "carried": carried}
    return record


def process_log(
    client: MlflowClient, run_id: str, since_ms: int, until_ms: int | None, loss_key: str = "train/loss"
) -> dict[str, Any]:
    """What one process logged to ``run_id`` (the values timestamped between its start and the next
    process's): its train/loss steps and every (metric, step) pair."""
    logged = []
    for key in client.get_run(run_id).data.metrics:
        for m in client.get_metric_history(run_id, key):
            if m.timestamp >= since_ms and (until_ms is None or m.timestamp < until_ms):
                logged.append((key, int(m.step)))
    return {"pairs": sorted(logged), "trained": sorted(s for k, s in logged if k == loss_key)}


def continued_from_checkpoint(
    log: dict[str, Any], resumed_step: int | None, carried: list[tuple[str, int]]
) -> dict[str, Any]:
    """Did a process continue from the checkpoint of ``resumed_step`` (None: it started fresh)? Its
    first trained step is that step (or it trained none before it was killed), and nothing it logged
    is below it but the metrics the checkpoint carried."""
    carried_pairs = {tuple(c) for c in carried}
    own = [(k, s) for k, s in log["pairs"] if (k, s) not in carried_pairs]
    trained = sorted(s for k, s in own if k == "train/loss")
    first = trained[0] if trained else None
    if resumed_step is None:
        return {"first_step_trained": first, "logged_below_resume_step": [], "continued": first in (None, 0)}
    below = sorted(f"{k}@{s}" for k, s in own if s < resumed_step)
    return {
        "first_step_trained": first,
        "logged_below_resume_step": below,
        "continued": first in (None, resumed_step) and not below,
    }


def newest_step_file(ckpt_dir: Path) -> int:
    """The highest N of the complete `stepNNNNNNN.ckpt` files (0: none yet)."""
    steps = [int(p.stem.removeprefix("step")) for p in ckpt_dir.glob("step*.ckpt") if p.stem[4:].isdigit()]
    return max(steps, default=0)


def writing(ckpt_dir: Path) -> bool:
    try:
        return any(e.name.startswith(".") and e.name.endswith(".tmp") for e in os.scandir(ckpt_dir))
    except FileNotFoundError:
        return False


def inject(
    proc: subprocess.Popen, fault: str, after_step: int, delay: float, ckpt_dir: Path
) -> dict[str, Any]:
    """Signal the run: at ``delay`` s after start (start-up faults) or ``delay`` s after the checkpoint of
    ``after_step`` appeared (sigkill-during-save: at the next moment a checkpoint write is in progress)."""
    started = time.monotonic()
    if fault != "sigkill-at-startup":
        while proc.poll() is None and newest_step_file(ckpt_dir) < after_step:
            time.sleep(0.002)
    mark = time.monotonic()
    while proc.poll() is None and time.monotonic() - mark < delay:
        time.sleep(0.002)
    if fault == "sigkill-during-save":
        while proc.poll() is None and not writing(ckpt_dir):
            pass  # busy-wait: a write of this tiny model lasts milliseconds
    at = time.monotonic() - started
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM if fault == "sigterm" else signal.SIGKILL)
    out = proc.communicate(timeout=600)[0]
    resumed = RESUMED.search(out)
    return {
        "fault": fault,
        "target_step": None if fault == "sigkill-at-startup" else after_step,
        "after_s": round(at, 2),
        "exit_status": proc.returncode,
        "resumed_from": resumed.group(1) if resumed else None,
        "resumed_from_step": int(resumed.group(2)) if resumed else None,
        "temporary_files_left": sorted(p.name for p in ckpt_dir.glob(".*.tmp")),
        "output_tail": out[-1500:],
    }


def metric_history(client: MlflowClient, run_id: str) -> dict[str, dict[int, list[float]]]:
    history: dict[str, dict[int, list[float]]] = {}
    for key in client.get_run(run_id).data.metrics:
        for m in client.get_metric_history(run_id, key):
            history.setdefault(key, {}).setdefault(m.step, []).append(m.value)
    return history


def compare(resumed: dict, reference: dict) -> dict[str, Any]:
    sd_r, sd_f = reference["state_dict"], resumed["state_dict"]
    max_diff = max(
        (
            (sd_f[k].double() - v.double()).abs().max().item()
            if v.is_floating_point()
            else float(not torch.equal(sd_f[k], v))
        )
        for k, v in sd_r.items()
    )
    different = sorted(k for k, v in sd_r.items() if not torch.equal(sd_f[k], v))
    opt_equal = all(
        torch.equal(a[key], b[key])
        for a, b in zip(
            reference["optimizer_states"][0]["state"].values(),
            resumed["optimizer_states"][0]["state"].values(),
            strict=True,
        )
        for key in a
    )
    loader = [x["loops"]["fit_loop"]["state_dict"].get("combined_loader") for x in (reference, resumed)]
    return {
        "global_step": [reference["global_step"], resumed["global_step"]],
        "tensors": len(sd_r),
        "tensors_different": different,
        "max_abs_diff": max_diff,
        "optimizer_identical": opt_equal,
        "scheduler_identical": reference["lr_schedulers"] == resumed["lr_schedulers"],
        "data_position_identical": loader[0] == loader[1],
    }


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python "
        f"{platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}, "
        "OMP_NUM_THREADS=1"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--root", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=HERE / "results.json")
    parser.add_argument("--no-results-md", action="store_true")
    opts = parser.parse_args()
    rng = random.Random(opts.seed)
    root = opts.root or Path(tempfile.mkdtemp(prefix="segldm-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    args = [*TINY, f"trainer.max_steps={opts.steps}"]

    t0 = time.monotonic()
    proc = start([*args, "run_name=reference", "hydra.run.dir=${paths.output_root}/reference"], root)
    first_ckpt_s = None
    while proc.poll() is None:  # time the first checkpoint, to place start-up faults and step delays
        if first_ckpt_s is None and newest_step_file(root / "outputs/reference/checkpoints") >= 2:
            first_ckpt_s = time.monotonic() - t0
        time.sleep(0.01)
    finish(proc)
    reference_s = time.monotonic() - t0
    first_ckpt_s = first_ckpt_s or reference_s / 2
    step_s = max(0.01, (reference_s - first_ckpt_s) / max(1, opts.steps - 2))
    startup_s = max(1.0, first_ckpt_s - 2 * step_s)
    print(
        f"reference: {opts.steps} steps in {reference_s:.1f} s (start-up ~{startup_s:.1f} s, ~{step_s:.2f} s/step)"
    )

    command = [*args, "run_name=faulty", "resume=auto"]
    folder = root / "outputs/runs/train/faulty"
    attempts: list[dict[str, Any]] = []
    started_ms: list[int] = []  # when each process of the killed command started (MLflow's clock)
    checkpoints_seen: list[dict[str, dict[str, Any]]] = []  # the checkpoints each one found
    done = 0  # newest complete checkpoint of the killed command
    for i in range(opts.kills):
        fault = rng.choice(FAULTS)
        # a checkpoint step past the resume point and well short of the end, then a delay of up to
        # one step (start-up faults: a moment of the start-up instead)
        first = done + 2 - done % 2
        targets = list(range(first, min(first + 2 * (opts.steps // opts.kills), opts.steps - 4), 2))
        if not targets:
            break
        target = rng.choice(targets)
        delay = (
            rng.uniform(0.3, 0.5 * startup_s) if fault == "sigkill-at-startup" else rng.uniform(0.0, step_s)
        )
        checkpoints_seen.append(checkpoint_record(folder))
        record = inject(start(command, root, started_ms), fault, target, delay, folder / "checkpoints")
        record["attempt"] = i + 1
        complete = complete_steps(folder)
        record["newest_step_after"] = max(complete, default=0)
        done = record["newest_step_after"]
        attempts.append(record)
        print(
            f"kill {i + 1}: {fault} (after step {record['target_step']}, +{delay:.2f} s) at {record['after_s']} s "
            f"-> exit {record['exit_status']}; resumed from step {record['resumed_from_step']}, newest complete "
            f"checkpoint now step {done}",
            flush=True,
        )
    checkpoints_seen.append(checkpoint_record(folder))
    out = finish(start(command, root, started_ms))
    resumed_from = next(
        (line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("resumed from")), None
    )
    final_plan = RESUMED.search(out)

    reference = torch.load(
        root / "outputs/reference/checkpoints/last.ckpt", map_location="cpu", weights_only=True
    )
    final = torch.load(folder / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    result = compare(final, reference)
    client = MlflowClient(f"sqlite:///{root}/outputs/mlflow.db")
    experiment = client.get_experiment_by_name("segldm")
    runs = {
        name: client.search_runs([experiment.experiment_id], f"attributes.run_name = '{name}'")
        for name in ("reference", "faulty")
    }
    ref_hist = metric_history(client, runs["reference"][0].info.run_id)
    faulty_hist = metric_history(client, runs["faulty"][0].info.run_id) if len(runs["faulty"]) == 1 else {}
    mismatched = sorted(
        f"{key}@{step}"
        for key, steps in ref_hist.items()
        for step, values in steps.items()
        if set(faulty_hist.get(key, {}).get(step, [])) != set(values)
    )
    extra = sorted(
        f"{k}@{s}" for k, steps in faulty_hist.items() for s in steps if s not in ref_hist.get(k, {})
    )
    duplicates = sum(
        max(0, len(v) - len(ref_hist[k][s]))
        for k, steps in faulty_hist.items()
        for s, v in steps.items()
        if s in ref_hist.get(k, {})
    )
    # 4. each process of the killed command continued from the checkpoint it names
    processes = [(a["resumed_from"], a["resumed_from_step"]) for a in attempts] + [
        (final_plan.group(1) if final_plan else None, int(final_plan.group(2)) if final_plan else None)
    ]
    continuation = []
    for i, (path, step) in enumerate(processes):
        if len(runs["faulty"]) != 1:
            break
        seen = checkpoints_seen[i].get(str(Path(path).resolve()), {}) if path else {}
        if path is not None and seen.get("global_step") != step:
            continuation.append({"continued": False, "error": f"{path} (step {step}) was not a checkpoint"})
            continue
        log = process_log(
            client,
            runs["faulty"][0].info.run_id,
            started_ms[i],
            started_ms[i + 1] if i + 1 < len(started_ms) else None,
        )
        continuation.append(continued_from_checkpoint(log, step, seen.get("carried", [])))
    for attempt, verdict in zip(attempts, continuation, strict=False):
        attempt.update(verdict)
    final_continuation = continuation[-1] if len(continuation) == len(processes) else {"continued": False}
    result.update(
        {
            "kills": len(attempts),
            "attempts": [{k: v for k, v in a.items() if k != "output_tail"} for a in attempts],
            "final_resumed_from": resumed_from,
            "mlflow_runs_of_the_killed_command": len(runs["faulty"]),
            "mlflow_status": runs["faulty"][0].info.status if runs["faulty"] else None,
            "metric_steps_mismatched": mismatched,
            "metric_steps_extra": extra,
            "metric_values_logged_twice": duplicates,
            "metrics_identical": len(runs["faulty"]) == 1 and not mismatched and not extra,
            "final_first_step_trained": final_continuation.get("first_step_trained"),
            "final_resumed_from_step": processes[-1][1],
            "every_process_continued_from_its_checkpoint": len(continuation) == len(processes)
            and all(c["continued"] for c in continuation),
            "reference_seconds": round(reference_s, 1),
            "total_seconds": round(time.monotonic() - t0, 1),
            "machine": machine(),
            "seed": opts.seed,
            "steps": opts.steps,
        }
    )
    result["identical"] = (
        not result["tensors_different"]
        and result["optimizer_identical"]
        and result["scheduler_identical"]
        and result["data_position_identical"]
        and result["global_step"][0] == result["global_step"][1] == opts.steps
    )
    opts.json.parent.mkdir(parents=True, exist_ok=True)
    opts.json.write_text(json.dumps(result, indent=2))
    if not opts.no_results_md:
        write_results_md(result)
    print(json.dumps({k: v for k, v in result.items() if k != "attempts"}, indent=2))
    ok = result["identical"] and result["metrics_identical"]
    return 0 if ok and result["every_process_continued_from_its_checkpoint"] else 1


def write_results_md(result: dict[str, Any]) -> None:
    rows = "\n".join(
        f"| {a['attempt']} | {a['fault']} | {a['resumed_from_step'] if a['resumed_from_step'] is not None else 'start'} "
        f"| {a.get('first_step_trained') if a.get('first_step_trained') is not None else '-'} "
        f"| {a['target_step'] if a['target_step'] is not None else 'start-up'} | {a['after_s']} | {a['exit_status']} "
        f"| {a['newest_step_after']} | {len(a['temporary_files_left'])} |"
        for a in result["attempts"]
    )
    same = result["identical"] and result["metrics_identical"]
    verdict = "identical" if same and result["every_process_continued_from_its_checkpoint"] else "DIFFERENT"
    text = f"""# Fault injection: killed and restarted training vs. an uninterrupted run

`make faults` (`python experiments/faults/run_faults.py --kills {result["kills"]} --seed {result["seed"]} --steps {result["steps"]}`).
Machine: {result["machine"]}.

A tiny deterministic CPU run (32 px synthetic scenes, 8 batches of 4 per epoch, {result["steps"]} steps =
{result["steps"] // 8} epochs, checkpoints every 2 steps, validation every 3) is trained once without
interruption ({result["reference_seconds"]} s) and once with `resume=auto`, killed {result["kills"]} times at random
moments and restarted with the same command each time ({result["total_seconds"]} s in all, reference included).

| kill | fault | started from step | first step it trained (MLflow) | fired after checkpoint of step | at (s after launch) | exit status | newest complete checkpoint after the kill | temporary files left by a killed write |
|---|---|---|---|---|---|---|---|---|
{rows}

Final run resumed from: `{result["final_resumed_from"]}` (step {result["final_resumed_from_step"]}); the first
step it trained: {result["final_first_step_trained"]}. Every restarted process continued from the checkpoint it
names (first step trained = its step, nothing logged below it but the metrics the checkpoint carried, read from
the MLflow values each process logged): {result["every_process_continued_from_its_checkpoint"]}.

**Result: {verdict}.** Final checkpoint at step {result["global_step"][1]} (reference {result["global_step"][0]}):
{result["tensors"] - len(result["tensors_different"])}/{result["tensors"]} state_dict tensors bit-identical
(max |difference| {result["max_abs_diff"]}), optimizer moments identical: {result["optimizer_identical"]},
LR scheduler identical: {result["scheduler_identical"]}, data position identical: {result["data_position_identical"]}.
MLflow: {result["mlflow_runs_of_the_killed_command"]} run for the killed command (status {result["mlflow_status"]});
steps whose values differ from the reference: {len(result["metric_steps_mismatched"])}, steps the reference
does not have: {len(result["metric_steps_extra"])}; values logged a second time for an already logged step
(steps after the last checkpoint replayed by the resumed process, equal values): {result["metric_values_logged_twice"]}.

Exit statuses: -9 = SIGKILL, 143 = SIGTERM handled (checkpoint written at the end of the step, then exit),
0 = the run finished before the fault fired. A "sigkill-during-save" fault fires while a temporary
checkpoint file exists, i.e. in the middle of a write; the previous `last.ckpt` stays complete.
Full record: `results.json`.
"""
    (HERE / "results.md").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
