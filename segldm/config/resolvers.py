"""OmegaConf resolvers for derived config values, so the YAML says `in_channels: ${segldm.add:...}`
instead of a comment. Registered when `segldm` is imported."""

from __future__ import annotations

import os

from omegaconf import OmegaConf

from segldm.config.derived import downsample_factor
from segldm.config.hardware import auto_precision
from segldm.config.metric_directions import objective_direction
from segldm.config.run_folder import run_dir


def num_devices(devices: object) -> int:
    """`trainer.devices` as a count, for launchers that must reserve resources (hydra/launcher=slurm)."""
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        return devices
    if (isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices)) and len(devices) > 0:
        return len(devices)
    raise ValueError(
        f"trainer.devices={devices!r} is not a number of devices; the SLURM launcher reserves one task and "
        "one GPU per device, so set it, e.g. trainer=ddp trainer.devices=4"
    )


def condition_channels(labels: int, instance_edges: object = False) -> int:
    """The cond stage's input channels: one per label, plus the instance-edge channel (segldm.condition)."""
    return int(labels) + int(bool(instance_edges))


def register_resolvers() -> None:
    resolvers = {
        "segldm.add": lambda *xs: sum(xs),
        "segldm.mul": lambda a, b: a * b,
        "segldm.floordiv": lambda a, b: a // b,
        "segldm.downsample": downsample_factor,
        "segldm.cwd": os.getcwd,
        "segldm.num_devices": num_devices,
        "segldm.run_dir": run_dir,
        "segldm.auto_precision": auto_precision,
        "segldm.objective_direction": objective_direction,
        "segldm.condition_channels": condition_channels,
    }
    for name, fn in resolvers.items():
        OmegaConf.register_new_resolver(name, fn, replace=True)
