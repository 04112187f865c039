"""The run folder of a command, stable when resuming (resolver ``segldm.run_dir``, conf/hydra/default.yaml).

``resume=auto`` (or ``ckpt_path=last``) continues "the same command", so its folder must be found
again: ``run_name=<name>`` names it, else the newest folder under the task whose saved Hydra
overrides equal this command's (ignoring ``resume`` and ``ckpt_path``), else a new timestamped one.
"""

from __future__ import annotations

import datetime
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)

IGNORED_OVERRIDE_KEYS = ("resume", "ckpt_path")


class ResumeWarning(UserWarning):
    """A checkpoint or run record was skipped while looking for what to resume."""


# ------------------------------------------------------------------------------------ run folder
def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def comparable_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides that define "the same command": without resume/ckpt_path and hydra.* keys."""
    return sorted(
        o
        for o in overrides
        if _override_key(o) not in IGNORED_OVERRIDE_KEYS and not _override_key(o).startswith("hydra.")
    )


def matching_run_folder(task_dir: str | Path, overrides: Sequence[str]) -> Path | None:
    """The newest folder under ``task_dir`` whose saved Hydra overrides are ``overrides``."""
    wanted = comparable_overrides(overrides)
    matches = []
    for saved in Path(task_dir).glob("*/.hydra/overrides.yaml"):
        try:
            previous = [str(o) for o in OmegaConf.load(saved)]
        except Exception as err:  # noqa: BLE001 (an unreadable record is skipped, never fatal)
            warnings.warn(f"resume=auto: skipping {saved}: {err}", ResumeWarning, stacklevel=2)
            continue
        if comparable_overrides(previous) == wanted:
            matches.append((saved.stat().st_mtime, saved.parent.parent))
    return max(matches)[1] if matches else None


def resumes_automatically(resume: Any, ckpt_path: Any) -> bool:
    """``resume=auto`` or ``ckpt_path=last``: continue this command's run folder from its newest checkpoint.

    The one statement of the rule: the run folder (:func:`run_dir`) and the checkpoint
    (``segldm.runtime.resume.plan_resume``) are both chosen by it.
    """
    return resume == "auto" or ckpt_path == "last"


def run_dir(
    task_dir: str,
    timestamp: str,
    resume: str | None = None,
    ckpt_path: str | None = None,
    run_name: Any = None,
) -> str:
    """Resolver ``segldm.run_dir`` (conf/hydra/default.yaml): the run folder, stable when resuming.

    Without resume=auto / ckpt_path=last: ``<task_dir>/<timestamp>`` as before. With them: the
    folder of ``run_name``, else the newest folder of the same overrides, else a new timestamped one.
    """
    if not resumes_automatically(resume, ckpt_path):
        return f"{task_dir}/{timestamp}"
    if run_name not in (None, ""):
        name = str(run_name)
        if "/" in name or name in (".", ".."):
            raise ValueError(f"run_name={name!r} names the run folder with resume=auto; use a plain name")
        return f"{task_dir}/{name}"
    if HydraConfig.initialized():
        found = matching_run_folder(task_dir, list(HydraConfig.get().overrides.task))
        if found is not None:
            return str(found)
    return f"{task_dir}/{timestamp}"


# ------------------------------------------------------------------------------------ throw-away runs
def is_throwaway(cfg: Any) -> bool:
    """A run nobody resumes or compares: Lightning's fast_dev_run (``trainer=debug``) in any form."""
    trainer = cfg.get("trainer") if hasattr(cfg, "get") else None
    return bool(trainer.get("fast_dev_run")) if trainer is not None and hasattr(trainer, "get") else False


def throwaway_run_dir(output_root: str | Path, task_name: str, now: datetime.datetime | None = None) -> str:
    """``<output_root>/debug/<task>/<timestamp>``: a debug run's own folder, never a real run's."""
    stamp = (now or datetime.datetime.now()).strftime("%Y-%m-%d_%H-%M-%S-%f")
    return f"{output_root}/debug/{task_name}/{stamp}"


class ThrowawayRunFolder(Callback):
    """Hydra callback (conf/train.yaml): a throw-away run gets its own folder, whatever the preset pins.

    Presets pin ``hydra.run.dir`` (the quickstart writes ``outputs/quickstart/ldm``) so that
    ``resume=auto`` finds the run again; a ``trainer=debug`` run of the same preset would otherwise
    write its step-1 checkpoint and ``.hydra/`` record over the real run's. Hydra calls this before it
    creates the run folder, so nothing of the debug run lands in the pinned one.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_throwaway(config):
            return
        folder = throwaway_run_dir(config.paths.output_root, str(config.get("task_name", "train")))
        with read_write(config), open_dict(config):
            config.hydra.run.dir = folder
        log.info("trainer.fast_dev_run: a throw-away run in its own folder %s", folder)
