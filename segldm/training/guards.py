"""Stop on a non-finite loss or non-finite gradients before the optimizer applies them.

A finite loss can still back-propagate inf/NaN (an overflow in one layer, a division by a tiny
norm); one such step writes NaN into every weight and the EMA, and the next checkpoint would keep
them. The check runs before each optimizer step, so the last checkpoint stays the last good state.
"""

from __future__ import annotations

import lightning as L
import torch

from segldm.storage.checkpoint_files import list_keys


def nonfinite_gradients(named_params: list[tuple[str, torch.nn.Parameter]]) -> list[str]:
    """Names of parameters whose gradient holds inf or NaN (one device sync when all are finite)."""
    grads = [p.grad for _, p in named_params if p.grad is not None]
    if not grads:
        return []
    total = torch.nn.utils.get_total_norm(grads, norm_type=float("inf"), error_if_nonfinite=False)
    if torch.isfinite(total):  # max |g| propagates NaN, and is finite exactly when every entry is
        return []
    return [name for name, p in named_params if p.grad is not None and not torch.isfinite(p.grad).all()]


class FiniteGradients(L.Callback):
    """Raise FloatingPointError naming the step, the batch and the parameters with non-finite gradients.

    Skipped under fp16 mixed precision: its GradScaler produces inf gradients on purpose and skips
    those steps itself.
    """

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        named = [(n, p) for n, p in pl_module.named_parameters() if id(p) in in_optimizer]
        bad = nonfinite_gradients(named)
        if bad:
            batch_idx = trainer.fit_loop.epoch_loop.batch_idx
            raise FloatingPointError(
                f"non-finite gradients at global step {trainer.global_step}, batch {batch_idx} in "
                f"{len(bad)} parameter(s): {list_keys(bad, 5)}; this step was not applied and training "
                "stopped, the last checkpoint written before it is intact. Lower the learning rate, set "
                "trainer.gradient_clip_val, or run with trainer.detect_anomaly=true to find the operation."
            )


__all__ = ["FiniteGradients", "nonfinite_gradients"]


def check_finite(loss: torch.Tensor, step: int, batch_idx: int) -> None:
    """Stop training on a NaN/inf loss before it reaches the weights (and the next checkpoint)."""
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"non-finite training loss ({loss.item()}) at global step {step}, batch {batch_idx}; "
            "training stopped, the last checkpoint written before this step is intact. "
            "Lower the learning rate or run with trainer.detect_anomaly=true to find the source."
        )
