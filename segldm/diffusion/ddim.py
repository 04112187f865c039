"""DDIM sampling (Song et al. 2021) with the CompVis timestep convention, as pure functions.

CompVis quirks kept on purpose (REFERENCE_NOTES §7): the 'uniform' timesteps are shifted by +1,
`alphas_prev[0]` is `alphas_cumprod[0]` rather than 1, sigmas are computed in float64 and used in
float32, and the random normal is drawn even when eta = 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

DDIM_DISCRETIZATIONS = ("uniform", "quad", "trailing")


def make_ddim_timesteps(method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int) -> np.ndarray:
    """The DDPM timesteps DDIM visits, ascending. 'uniform' is CompVis's range(0, T, T // S) + 1;
    'trailing' (Lin et al. 2024) is round(T - k T / S) - 1 for k < S: it starts at t = T - 1, the
    pure-noise step of a zero-terminal-SNR schedule."""
    if method == "trailing":
        return trailing_timesteps(num_ddim_timesteps, num_ddpm_timesteps)
    steps = shifted_ddim_timesteps(method, num_ddim_timesteps, num_ddpm_timesteps)
    if steps[-1] >= num_ddpm_timesteps:
        # The reference indexes alphas_cumprod[T] here and dies with an IndexError.
        below, above = nearest_valid_ddim_steps(num_ddim_timesteps, num_ddpm_timesteps, method)
        options = " or ".join(str(n) for n in (below, above) if n is not None)
        raise ValueError(
            f"{num_ddim_timesteps} DDIM steps over {num_ddpm_timesteps} timesteps give t={steps[-1]} "
            f"after CompVis's +1 shift, which is out of range; the nearest step counts that work are {options}"
        )
    return steps


def trailing_timesteps(num_ddim_timesteps: int, num_ddpm_timesteps: int) -> np.ndarray:
    """S timesteps from T - 1 down in strides of T / S (rounded), ascending (diffusers' "trailing")."""
    if not 0 < num_ddim_timesteps <= num_ddpm_timesteps:
        raise ValueError(
            f"DDIM steps ({num_ddim_timesteps}) must be in [1, {num_ddpm_timesteps}] (the model's timesteps)"
        )
    steps = np.round(np.arange(num_ddpm_timesteps, 0, -num_ddpm_timesteps / num_ddim_timesteps)).astype(
        np.int64
    )
    return np.sort(steps - 1)


def shifted_ddim_timesteps(method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int) -> np.ndarray:
    """CompVis's `make_ddim_timesteps` (with its +1 shift), before any range check."""
    if num_ddim_timesteps <= 0:
        raise ValueError(f"DDIM steps must be positive, got {num_ddim_timesteps}")
    if num_ddim_timesteps > num_ddpm_timesteps:
        raise ValueError(
            f"DDIM steps ({num_ddim_timesteps}) cannot exceed the model's timesteps ({num_ddpm_timesteps})"
        )
    if method == "uniform":
        stride = num_ddpm_timesteps // num_ddim_timesteps
        steps = np.asarray(list(range(0, num_ddpm_timesteps, stride)), dtype=np.int64)
    elif method == "quad":
        steps = (np.linspace(0, np.sqrt(num_ddpm_timesteps * 0.8), num_ddim_timesteps) ** 2).astype(np.int64)
    else:
        raise ValueError(f"unknown DDIM discretization {method!r}; expected one of {DDIM_DISCRETIZATIONS}")
    return steps + 1


def ddim_steps_valid(num_ddim_timesteps: int, num_ddpm_timesteps: int, method: str = "uniform") -> bool:
    """Whether CompVis's DDIM schedule with this many steps stays inside [0, num_ddpm_timesteps)."""
    if not 0 < num_ddim_timesteps <= num_ddpm_timesteps:
        return False
    return bool(
        shifted_ddim_timesteps(method, num_ddim_timesteps, num_ddpm_timesteps)[-1] < num_ddpm_timesteps
    )


def nearest_valid_ddim_steps(
    num_ddim_timesteps: int, num_ddpm_timesteps: int, method: str = "uniform"
) -> tuple[int | None, int | None]:
    """The closest step counts below and above `num_ddim_timesteps` that `ddim_steps_valid` accepts."""
    below = next(
        (n for n in range(num_ddim_timesteps - 1, 0, -1) if ddim_steps_valid(n, num_ddpm_timesteps, method)),
        None,
    )
    above = next(
        (
            n
            for n in range(num_ddim_timesteps + 1, num_ddpm_timesteps + 1)
            if ddim_steps_valid(n, num_ddpm_timesteps, method)
        ),
        None,
    )
    return below, above


def check_ddim_steps(steps: int, num_ddpm_timesteps: int, key: str, method: str = "uniform") -> None:
    """Raise ValueError naming the config `key` when DDIM cannot run `steps` steps on this model."""
    try:
        make_ddim_timesteps(method, int(steps), int(num_ddpm_timesteps))
    except ValueError as err:
        raise ValueError(f"{key}={steps}: {err}") from None


@dataclass(frozen=True)
class DDIMParameters:
    """Per-step coefficients, indexed like `timesteps` (ascending)."""

    timesteps: torch.Tensor  # int64 (S,)
    alphas: torch.Tensor  # float32 alphas_cumprod[t]
    alphas_prev: torch.Tensor  # float64: [ac[0]] + ac[t[:-1]]
    sigmas: torch.Tensor  # float64
    sqrt_one_minus_alphas: torch.Tensor  # float32

    def __len__(self) -> int:
        return int(self.timesteps.numel())

    def step(
        self,
        x: torch.Tensor,
        eps: torch.Tensor,
        index: int,
        noise: torch.Tensor,
        pred_x0: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`ddim_step` with the coefficients of step ``index``; returns (x_prev, pred_x0)."""
        return ddim_step(
            x,
            eps,
            float(self.alphas[index]),
            float(self.alphas_prev[index]),
            float(self.sigmas[index]),
            float(self.sqrt_one_minus_alphas[index]),
            noise,
            pred_x0,
        )


def ddim_parameters(alphas_cumprod: torch.Tensor, timesteps: np.ndarray, eta: float) -> DDIMParameters:
    """Coefficients of the DDIM update for the given timesteps and stochasticity eta."""
    if eta < 0:
        raise ValueError(f"DDIM eta must be >= 0, got {eta}")
    ac = alphas_cumprod.detach().cpu().to(torch.float32)
    steps = torch.as_tensor(timesteps, dtype=torch.long)
    alphas = ac[steps]
    alphas_prev = torch.cat([ac[:1], ac[steps[:-1]]]).to(torch.float64)
    sigmas = eta * torch.sqrt((1 - alphas_prev) / (1 - alphas.double()) * (1 - alphas.double() / alphas_prev))
    return DDIMParameters(
        timesteps=steps,
        alphas=alphas,
        alphas_prev=alphas_prev,
        sigmas=sigmas,
        sqrt_one_minus_alphas=torch.sqrt(1.0 - alphas),
    )


def ddim_step(
    x: torch.Tensor,
    eps: torch.Tensor,
    a_t: float,
    a_prev: float,
    sigma_t: float,
    sqrt_one_minus_a_t: float,
    noise: torch.Tensor,
    pred_x0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update from x_t to x_{t_prev}; returns (x_prev, pred_x0). Coefficients in float32.

    ``pred_x0`` given (v and x0 models): used as is instead of (x - sqrt(1 - a) eps) / sqrt(a), which
    is 0/0 at the terminal step of a zero-terminal-SNR schedule (a = 0).
    """
    f32 = torch.float32

    def full(value: float) -> torch.Tensor:
        return torch.tensor(value, dtype=f32, device=x.device)

    a_t_, a_prev_, sigma_, s1m = full(a_t), full(a_prev), full(sigma_t), full(sqrt_one_minus_a_t)
    if pred_x0 is None:
        pred_x0 = (x - s1m * eps) / a_t_.sqrt()
    dir_xt = (1.0 - a_prev_ - sigma_**2).sqrt() * eps
    x_prev = a_prev_.sqrt() * pred_x0 + dir_xt + sigma_ * noise
    return x_prev, pred_x0


def per_sample_randn(
    shape: Sequence[int],
    generators: Sequence[torch.Generator] | None,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Standard normal noise; with one generator per sample, row i depends only on generator i."""
    if generators is None:
        return torch.randn(*shape, device=device, dtype=dtype)
    if len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}")
    rows = [torch.randn(*shape[1:], generator=g, device=g.device, dtype=dtype).to(device) for g in generators]
    return torch.stack(rows)


def ddim_sample(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    params: DDIMParameters,
    generators: Sequence[torch.Generator] | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
    """Run DDIM from x_T through `params.timesteps` in descending order.

    `model_fn(x, t)` returns the predicted noise. Returns the final x and the per-step
    intermediates {'x_inter': [...], 'pred_x0': [...]}.
    """
    x = x_T
    batch = x.shape[0]
    intermediates: dict[str, list[torch.Tensor]] = {"x_inter": [], "pred_x0": []}
    indices = list(reversed(range(len(params))))
    for index in tqdm(indices, desc="DDIM", disable=not progress, leave=False):
        t = torch.full((batch,), int(params.timesteps[index]), device=x.device, dtype=torch.long)
        out = model_fn(x, t)  # eps, or (eps, x0) from models that predict x0 themselves (v, x0)
        eps, given_x0 = out if isinstance(out, tuple) else (out, None)
        noise = per_sample_randn(x.shape, generators, x.device, x.dtype)
        x, pred_x0 = params.step(x, eps, index, noise, given_x0)
        intermediates["x_inter"].append(x)
        intermediates["pred_x0"].append(pred_x0)
    return x, intermediates
