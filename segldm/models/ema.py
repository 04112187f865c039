"""CompVis-compatible ``LitEma``: exponential moving average of trainable parameters held as buffers.

The buffers are what a CompVis checkpoint stores under ``model_ema.*``: ``decay`` (0-dim float32),
``num_updates`` (0-dim int32, -1 when the warm-up is disabled) and one shadow per trainable parameter
named after the parameter with every ``.`` removed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def shadow_name(param_name: str) -> str:
    """Buffer name of a parameter's shadow: the name with the dots removed (reference convention)."""
    return param_name.replace(".", "")


class LitEma(nn.Module):
    """EMA of ``model``'s trainable parameters; call ``ema(model)`` after every optimiser step.

    Update (the reference's, float32): ``n += 1; d = min(decay, (1 + n) / (10 + n));
    shadow -= (1 - d) * (shadow - param)``, computed as one in-place ``lerp`` per tensor (a third of
    the memory traffic of the three-op form; equal to it within one rounding of the result). ``use_num_upates`` keeps the reference's misspelling;
    ``use_num_updates`` is accepted as an alias and wins when given.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        use_num_upates: bool = True,
        *,
        use_num_updates: bool | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"LitEma: decay must be between 0 and 1, got {decay}")
        if use_num_updates is not None:
            use_num_upates = use_num_updates
        self.m_name2s_name: dict[str, str] = {}
        taken = {"decay", "num_updates"}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_upates else -1, dtype=torch.int32))
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            s_name = shadow_name(name)
            if s_name in taken:
                raise ValueError(f"LitEma: parameter {name!r} collides with another shadow name {s_name!r}")
            self.m_name2s_name[name] = s_name
            taken.add(s_name)
            self.register_buffer(s_name, p.detach().clone())
        self.collected_params: list[torch.Tensor] = []

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(shadows, params) in matching order for the trainable parameters of ``model``."""
        buffers = dict(self.named_buffers())
        shadows, params = [], []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                if name in self.m_name2s_name:
                    raise ValueError(f"LitEma: parameter {name!r} has a shadow but is frozen now")
                continue
            if name not in self.m_name2s_name:
                raise KeyError(f"LitEma: trainable parameter {name!r} has no shadow (model changed?)")
            shadows.append(buffers[self.m_name2s_name[name]])
            params.append(p)
        return shadows, params

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One EMA step towards the current parameters of ``model``."""
        decay = self.decay
        if self.num_updates >= 0:
            self.num_updates += 1
            decay = torch.minimum(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        one_minus_decay = float(1.0 - decay)  # the float32 value the reference computes
        shadows, params = self._pairs(model)
        params = [param.to(shadow.dtype) for shadow, param in zip(shadows, params, strict=True)]
        # one in-place pass per tensor (read shadow and param, write shadow): shadow + w (param - shadow),
        # the reference's shadow - w (shadow - param) up to the last bit (lerp may fuse the multiply-add)
        torch._foreach_lerp_(shadows, params, one_minus_decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s trainable parameters with the shadows (e.g. for EMA sampling)."""
        shadows, params = self._pairs(model)
        for shadow, param in zip(shadows, params, strict=True):
            param.copy_(shadow)

    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Remember copies of ``parameters`` so :meth:`restore` can undo a :meth:`copy_to`."""
        self.collected_params = [param.detach().clone() for param in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Put back the values saved by :meth:`store` (same order)."""
        parameters = list(parameters)
        if len(parameters) != len(self.collected_params):
            raise ValueError(
                f"LitEma.restore: got {len(parameters)} parameters, "
                f"but {len(self.collected_params)} were stored"
            )
        for saved, param in zip(self.collected_params, parameters, strict=True):
            param.copy_(saved)
        self.collected_params = []
