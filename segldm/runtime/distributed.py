"""Multi-process training under Hydra: DDP whose extra processes re-run *this job*, not the command line.

Lightning's DDP ("popen") launcher starts local ranks 1..N-1 by re-running the command line
(`sys.argv`) with `hydra.run.dir=<hydra.run.dir>` appended (Lightning 2.6.6,
`lightning.fabric.strategies.launchers.subprocess_script._hydra_subprocess_cmd`). Inside a Hydra
multirun that goes wrong three ways:

1. the command line still holds `-m` and the sweep (`lr=1e-6,1e-5`, `hparams_search=...`), so
   every child starts a whole sweep of its own;
2. `hydra.run.dir` is the *run* folder pattern (`outputs/runs/...${now:...}`), not the job's
   folder in the sweep, so children write another output folder (and another checkpoint dir);
3. under the joblib launcher the job runs in a loky worker whose `__main__` is loky's, so the
   re-run command is not even segldm's.

`HydraDDPStrategy` keeps Lightning's launcher but builds each child's command from the running
job itself: `python -m <entry_module> <this job's overrides> hydra.run.dir=<this job's output
folder> hydra.output_subdir=null hydra.mode=RUN`. Children therefore compose exactly the job's
config (swept values included), write into the job's folder, never start a multirun, and leave
`.hydra/` to rank 0. Cluster launchers that start every rank themselves (SLURM/submitit, torchrun)
do not go through this path at all.

It also re-seeds each rank with `seed + global_rank` once the process group exists: Lightning seeds
every process with the same seed, so otherwise all ranks would draw the same diffusion timesteps
and noise for their (different) images. Model weights are initialised before that, identically.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

# Hydra overrides that describe how the parent was launched; a child must not inherit them.
_LAUNCH_ONLY = (
    "hydra.mode",
    "hydra.run.dir",
    "hydra.output_subdir",
    "hydra.job.name",
    "hydra.sweep",
    "hydra.sweeper",
    "hydra/sweeper",
    "hydra.launcher",
    "hydra/launcher",
)


def _quoted(value: str) -> str:
    """A Hydra override value that keeps `=`, `,`, spaces and brackets of a path literal."""
    for quote in ("'", '"'):
        if quote not in value:
            return f"{quote}{value}{quote}"
    raise ValueError(f"cannot pass the path {value!r} to a DDP child process: it contains both quote kinds")


def hydra_child_command(local_rank: int, entry_module: str = "segldm.train") -> tuple[list[str], str]:
    """(argv, cwd) that re-run the current Hydra job as one more rank, in the same output folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    hydra_cfg = HydraConfig.get()
    kept_hydra = [o for o in hydra_cfg.overrides.hydra if not o.lstrip("+~").startswith(_LAUNCH_ONLY)]
    command = [
        sys.executable,
        "-m",
        entry_module,
        *hydra_cfg.overrides.task,
        *kept_hydra,
        f"hydra.run.dir={_quoted(str(Path(hydra_cfg.runtime.output_dir).resolve()))}",
        "hydra.output_subdir=null",
        f"hydra.job.name={hydra_cfg.job.name}_rank{local_rank}",
        "hydra.mode=RUN",
    ]
    return command, get_original_cwd()


class HydraJobScriptLauncher(_SubprocessScriptLauncher):
    """Lightning's subprocess launcher with the child command of `hydra_child_command`.

    Mirrors `_SubprocessScriptLauncher._call_children_scripts` of Lightning 2.6.6 (the pinned
    version) except for the command; without Hydra it is Lightning's own behaviour.
    """

    def __init__(self, *args: Any, entry_module: str = "segldm.train", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.entry_module = entry_module

    def _call_children_scripts(self) -> None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            super()._call_children_scripts()
            return
        self._check_can_spawn_children()
        self.procs = []
        env_cluster = self.cluster_environment
        os.environ["MASTER_ADDR"] = env_cluster.main_address
        os.environ["MASTER_PORT"] = str(env_cluster.main_port)
        os.environ["NODE_RANK"] = str(env_cluster.node_rank())
        os.environ["LOCAL_RANK"] = str(env_cluster.local_rank())
        os.environ["WORLD_SIZE"] = f"{self.num_processes * self.num_nodes}"
        for local_rank in range(1, self.num_processes):
            env = os.environ.copy()
            env["LOCAL_RANK"] = str(local_rank)
            if os.environ.get("PL_GLOBAL_SEED") is None:
                env.pop("PL_GLOBAL_SEED", None)
            command, cwd = hydra_child_command(local_rank, self.entry_module)
            self.procs.append(subprocess.Popen(command, env=env, cwd=cwd))


class HydraDDPStrategy(DDPStrategy):
    """DDP for Hydra jobs (conf/trainer/ddp.yaml): correct child commands, one seed per rank.

    `entry_module` is what children run (`python -m <entry_module>`); `per_rank_seed` re-seeds
    torch/numpy/random with `PL_GLOBAL_SEED + global_rank` after the process group is up. Other
    keyword arguments go to `DistributedDataParallel` (e.g. `broadcast_buffers=False`).
    """

    def __init__(
        self, *args: Any, entry_module: str = "segldm.train", per_rank_seed: bool = True, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        self.entry_module = entry_module
        self.per_rank_seed = per_rank_seed

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if type(self._launcher) is _SubprocessScriptLauncher:
            self._launcher = HydraJobScriptLauncher(
                self.cluster_environment, self.num_processes, self.num_nodes, entry_module=self.entry_module
            )

    def setup_environment(self) -> None:
        super().setup_environment()
        seed = os.environ.get("PL_GLOBAL_SEED")
        if self.per_rank_seed and seed is not None:
            rank_seed = int(seed) + self.global_rank
            torch.manual_seed(rank_seed)
            np.random.seed(rank_seed % 2**32)
            random.seed(rank_seed)
