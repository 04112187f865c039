"""A Lightning callback for tests/integration/test_ddp.py: what each DDP rank saw and did, saved to files.

Per rank r and optimizer step k it writes `<out_dir>/rank{r}.pt` holding the initial state_dict,
every step's batch, the torch RNG state right before the step's forward (the model's own
`on_train_batch_start` draws nothing), the loss, the gradients after DDP's all-reduce, and the
final state_dict. The test replays each rank's forward from those in one process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch


def _cpu(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(v) for v in value)
    return value


class DDPProbe(L.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.record: dict[str, Any] = {"steps": []}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record.update(
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            init=_cpu(pl_module.state_dict()),
            lr=[g["lr"] for g in trainer.optimizers[0].param_groups],
            initial_lr=[g["initial_lr"] for g in trainer.optimizers[0].param_groups],
        )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.record["steps"].append({"batch": _cpu(batch), "rng": torch.get_rng_state()})

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        grads = {n: _cpu(p.grad) for n, p in pl_module.named_parameters() if p.grad is not None}
        self.record["steps"][-1]["grads"] = grads

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.record["steps"][-1]["loss"] = _cpu(outputs["loss"])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["final"] = _cpu(pl_module.state_dict())
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(self.record, self.out_dir / f"rank{trainer.global_rank}.pt")
