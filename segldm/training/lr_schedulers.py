"""Learning-rate multipliers f(step), wrapped in torch's LambdaLR and stepped per optimizer step.

Each scheduler is a small callable so the math can be tested against closed forms and the config
group `scheduler` only picks one and fills its numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch


def _as_list(value: float | int | Sequence[float]) -> list[float]:
    if isinstance(value, (int, float)):
        return [value]
    return list(value)


def _numbers(scheduler: str, **values: Any) -> None:
    """Refuse a non-number, e.g. LambdaLinearScheduler's one-per-cycle list left in the node by an override."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                f"scheduler.{name}={value!r} must be one number for {scheduler} "
                "(lists, one entry per cycle, are LambdaLinearScheduler's)"
            )


class ScheduleChecks:
    """The start-up question every scheduler answers: can its config be built? (runtime/checks.py)"""

    @classmethod
    def startup_problems(cls, config: dict[str, Any], key: str) -> list[str]:
        arguments = {name: value for name, value in config.items() if not name.startswith("_")}
        try:
            schedule = cls(**arguments)
            schedule(0)
        except (TypeError, ValueError) as err:
            return [f"{key} ({cls.__name__}): {err}"]
        return []


class LambdaLinearScheduler(ScheduleChecks):
    """CompVis's LambdaLinearScheduler: per cycle, linear warm-up f_start -> f_max, then linear f_max -> f_min.

    A step belongs to the first cycle whose cumulative end it has not passed (`step <= cum[i+1]`).
    Scalars are accepted where CompVis wants one-element lists, so sweeps can say
    `scheduler.warm_up_steps=1000`.
    """

    def __init__(
        self,
        warm_up_steps: int | Sequence[int],
        f_min: float | Sequence[float],
        f_max: float | Sequence[float],
        f_start: float | Sequence[float],
        cycle_lengths: float | Sequence[float],
        verbosity_interval: int = 0,
    ) -> None:
        self.lr_warm_up_steps = [int(w) for w in _as_list(warm_up_steps)]
        self.f_min = _as_list(f_min)
        self.f_max = _as_list(f_max)
        self.f_start = _as_list(f_start)
        self.cycle_lengths = _as_list(cycle_lengths)
        lengths = {len(self.lr_warm_up_steps), len(self.f_min), len(self.f_max), len(self.f_start)}
        if lengths != {len(self.cycle_lengths)}:
            raise ValueError(
                "scheduler lists must all have one entry per cycle: "
                f"warm_up_steps={self.lr_warm_up_steps}, f_min={self.f_min}, f_max={self.f_max}, "
                f"f_start={self.f_start}, cycle_lengths={self.cycle_lengths}"
            )
        if any(w < 0 for w in self.lr_warm_up_steps):
            raise ValueError(f"scheduler.warm_up_steps must be >= 0, got {self.lr_warm_up_steps}")
        self.cum_cycles = [0.0]
        for length in self.cycle_lengths:
            self.cum_cycles.append(self.cum_cycles[-1] + float(length))
        self.verbosity_interval = verbosity_interval

    def find_in_interval(self, n: int) -> int:
        for cycle, end in enumerate(self.cum_cycles[1:]):
            if n <= end:
                return cycle
        return len(self.cycle_lengths) - 1

    def schedule(self, n: int) -> float:
        cycle = self.find_in_interval(n)
        n = n - self.cum_cycles[cycle]
        warm_up = self.lr_warm_up_steps[cycle]
        if n < warm_up:
            return self.f_start[cycle] + (self.f_max[cycle] - self.f_start[cycle]) * n / warm_up
        length = self.cycle_lengths[cycle]
        return self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle]) * (length - n) / length

    def __call__(self, n: int) -> float:
        return self.schedule(n)


class CosineScheduler(ScheduleChecks):
    """Linear warm-up from f_start to 1 over warm_up_steps, then cosine decay to f_min at max_steps."""

    def __init__(self, warm_up_steps: int, max_steps: int, f_start: float = 0.0, f_min: float = 0.0) -> None:
        _numbers(
            "CosineScheduler", warm_up_steps=warm_up_steps, max_steps=max_steps, f_start=f_start, f_min=f_min
        )
        if warm_up_steps < 0 or max_steps <= 0:
            raise ValueError(
                f"scheduler.warm_up_steps must be >= 0 and scheduler.max_steps > 0, "
                f"got warm_up_steps={warm_up_steps}, max_steps={max_steps}"
            )
        self.warm_up_steps = warm_up_steps
        self.max_steps = max_steps
        self.f_start = f_start
        self.f_min = f_min

    def __call__(self, n: int) -> float:
        if n < self.warm_up_steps:
            return self.f_start + (1.0 - self.f_start) * n / self.warm_up_steps
        span = max(1, self.max_steps - self.warm_up_steps)
        progress = min(1.0, (n - self.warm_up_steps) / span)
        return self.f_min + (1.0 - self.f_min) * 0.5 * (1.0 + math.cos(math.pi * progress))


class ConstantScheduler(ScheduleChecks):
    """Constant multiplier 1, after an optional linear warm-up from f_start."""

    def __init__(self, warm_up_steps: int = 0, f_start: float = 1.0) -> None:
        _numbers("ConstantScheduler", warm_up_steps=warm_up_steps, f_start=f_start)
        if warm_up_steps < 0:
            raise ValueError(f"scheduler.warm_up_steps must be >= 0, got {warm_up_steps}")
        self.warm_up_steps = warm_up_steps
        self.f_start = f_start

    def __call__(self, n: int) -> float:
        if n < self.warm_up_steps:
            return self.f_start + (1.0 - self.f_start) * n / self.warm_up_steps
        return 1.0


def learning_rate_factors(trainer: Any) -> dict[str, int]:
    """What the global batch is made of: per-device batch size, accumulation, devices per node, nodes."""
    return {
        "batch": int(getattr(getattr(trainer, "datamodule", None), "batch_size", 1)),
        "accumulation": int(trainer.accumulate_grad_batches),
        "devices": max(1, int(trainer.num_devices)),
        "nodes": max(1, int(getattr(trainer, "num_nodes", 1))),
    }


def effective_learning_rate(base_learning_rate: float, trainer: Any, scale_lr: bool) -> float:
    """base lr x batch size x accumulation x devices x nodes when scale_lr (CompVis main.py's --scale_lr).

    CompVis multiplies by the GPUs of one node (it trained on one); the global batch also grows
    with the nodes, so the linear scaling rule multiplies by them too (1 on one machine).
    """
    if not scale_lr or trainer is None:
        return base_learning_rate
    return base_learning_rate * math.prod(learning_rate_factors(trainer).values())


def optimizer_config(
    optimizer: torch.optim.Optimizer, lr_lambda: Callable[[int], float] | None
) -> torch.optim.Optimizer | dict[str, Any]:
    """Lightning's optimizer config with the multiplier wrapped in LambdaLR, stepped per optimizer step."""
    if lr_lambda is None:
        return optimizer
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lr_lambda)
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
    }


def report_learning_rate(module: L.LightningModule, lr: float) -> None:
    """Print the effective lr and record it with the run (it depends on batch size and devices)."""
    factors = (
        learning_rate_factors(module._trainer) if module.scale_lr and module._trainer is not None else {}
    )
    product = " x ".join(f"{name} {value}" for name, value in factors.items())
    module.print(
        f"effective learning rate {lr:.4g} (base {module.base_learning_rate:.4g}, scale_lr={module.scale_lr}"
        + (f": base x {product})" if product else ")")
    )
    if module._trainer is not None:
        for logger in module.trainer.loggers:
            logger.log_hyperparams({"effective_learning_rate": lr})
