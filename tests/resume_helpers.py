"""What tells a resume from a silent restart (issue 22).

A resumed run has the seed and determinism of the uninterrupted one, so a process that ignored its
checkpoint and trained again from step 0 ends bit-identical; and sets of values per step do not show
the early steps it logged a second time. What tells them apart is what the resumed *process* did.
MLflow keeps, with every metric value, the wall-clock time it was logged at (Lightning's MLFlowLogger:
``int(time() * 1000)`` in the training process), so one process's entries are those logged after it
was started (and before the next one was). A process resumed from the checkpoint of step N trains
and logs step N first and nothing below it, except the step metrics the checkpoint carries because
Lightning had not sent them yet when it was written (segldm.runtime.resume.TrainingState logs them on
resuming when the store lacks them, at their step, N - 1); a process that restarted logs step 0 again.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import torch

from segldm.runtime.resume import TrainingState

# segldm.runtime.resume.plan_resume's line, logged by the process it plans for
RESUME_LINE = re.compile(r"resume=auto: (\S+) \(global step (\d+)\)")


def now_ms() -> int:
    """The clock MLflow's metric timestamps use: take it just before starting the process to watch."""
    return int(time.time() * 1000)


def load_checkpoints(folder: Path) -> dict[str, dict]:
    """Every complete checkpoint of a run folder by path, read before a resume overwrites any of them."""
    paths = [*folder.glob("checkpoints/*.ckpt"), *folder.glob("hpc_ckpt_*.ckpt")]
    return {str(p): torch.load(p, map_location="cpu", weights_only=True) for p in paths}


def planned_resume(output: str) -> tuple[str, int]:
    """(checkpoint path, global step) that a resume=auto process says it resumes from."""
    found = RESUME_LINE.findall(output)
    assert len(found) == 1, f"expected one 'resume=auto: <ckpt> (global step N)' line, got {found}"
    return found[0][0], int(found[0][1])


def logged_between(
    client: Any, run_id: str, since_ms: int, until_ms: int | None = None
) -> list[tuple[str, int]]:
    """(metric, step) of every value logged to ``run_id`` at since_ms <= timestamp < until_ms: one process's."""
    logged = []
    for key in client.get_run(run_id).data.metrics:
        for m in client.get_metric_history(run_id, key):
            if m.timestamp >= since_ms and (until_ms is None or m.timestamp < until_ms):
                logged.append((key, int(m.step)))
    return sorted(logged)


def carried_metrics(checkpoint: dict) -> set[tuple[str, int]]:
    """(metric, step) of the step metrics a checkpoint carries (TrainingState's unlogged_metrics)."""
    state = (checkpoint.get("callbacks") or {}).get(TrainingState.__qualname__) or {}
    pending = state.get("unlogged_metrics") or {}
    return {(key, int(pending["step"])) for key in pending.get("metrics", {})}


def assert_process_resumed_from(
    client: Any,
    run_id: str,
    checkpoint: dict,
    since_ms: int,
    until_ms: int | None = None,
    last_step: int | None = None,
    loss_key: str = "train/loss",
) -> list[tuple[str, int]]:
    """The process started at ``since_ms`` (until ``until_ms``) continued from ``checkpoint`` (of step N):
    the first step it trained (``loss_key`` is logged every step) is N, it logged nothing below N but
    what the checkpoint carries, and, with ``last_step``, it trained each step from N to ``last_step``
    once. Returns what it logged as (metric, step)."""
    step = int(checkpoint["global_step"])
    assert step > 0, f"a checkpoint of step {step} cannot tell a resume from a restart"
    logged = logged_between(client, run_id, since_ms, until_ms)
    carried = carried_metrics(checkpoint)
    own = [(key, s) for key, s in logged if (key, s) not in carried]
    trained = [s for key, s in own if key == loss_key]
    assert trained, f"the resumed process logged no {loss_key} to MLflow run {run_id}: {logged}"
    assert trained[0] == step, (
        f"the resumed process trained step {trained[0]} first, but it was resumed from the checkpoint of "
        f"step {step}: it did not continue from its checkpoint (its {loss_key} steps: {trained})"
    )
    below = [f"{key}@{s}" for key, s in own if s < step]
    assert not below, f"the process resumed at step {step} logged steps before it: {below}"
    if last_step is not None:
        assert trained == list(range(step, last_step + 1)), trained
    return logged
