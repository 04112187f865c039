"""Validation draws that rank runs: per-sample timesteps and noise fixed by the sample's key, stratified
over [0, T), independent of batch, step and the training random stream; the loss's standard error."""

from __future__ import annotations

import math

import torch

from segldm.diffusion.validation import (
    mean_and_standard_error,
    stratified_timestep,
    validation_draws,
)
from tests.unit.test_ldm import tiny_ldm


def test_timesteps_are_stratified_over_the_whole_range() -> None:
    for n in (16, 64, 250):
        ts = sorted(stratified_timestep(i, 1000) for i in range(n))
        gaps = [b - a for a, b in zip([0, *ts], [*ts, 1000], strict=True)]
        assert max(gaps) <= math.ceil(2.7 * 1000 / n), (n, max(gaps))  # golden-ratio (three-gap) bound
        counts = torch.bincount(torch.tensor(ts) * 4 // 1000, minlength=4)
        assert int(counts.max() - counts.min()) <= max(2, n // 20)  # each quarter of [0, T) about equally


def test_draws_depend_on_the_key_only() -> None:
    t_all, noise_all = validation_draws([0, 1, 2, 3], (3, 4, 4), 1000, 0, torch.device("cpu"))
    torch.manual_seed(123)  # the global stream plays no part
    t_two, noise_two = validation_draws([2, 3], (3, 4, 4), 1000, 0, torch.device("cpu"))
    assert torch.equal(t_all[2:], t_two) and torch.equal(noise_all[2:], noise_two)
    t_str, _ = validation_draws(["a/x.png", "a/x.png"], (3, 4, 4), 1000, 0, torch.device("cpu"))
    assert t_str[0] == t_str[1]
    _, other_seed = validation_draws([0, 1, 2, 3], (3, 4, 4), 1000, 1, torch.device("cpu"))
    assert not torch.allclose(other_seed, noise_all)


def test_standard_error_is_the_closed_form() -> None:
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mean, se = mean_and_standard_error(values)
    assert mean == 2.5 and math.isclose(se, math.sqrt(5.0 / 3.0) / 2.0, rel_tol=1e-12)  # s = sqrt(5/3)
    assert mean_and_standard_error(torch.tensor([5.0])) == (5.0, 0.0)


def test_validation_loss_is_the_same_at_every_validation() -> None:
    model = tiny_ldm().eval()
    images = torch.rand(4, 32, 32, 3) * 2 - 1
    batch = {"image": images, "label_map": torch.randint(0, 8, (4, 32, 32)), "index": torch.arange(10, 14)}
    torch.manual_seed(0)
    first, logs = model.validation_losses(batch, 0)
    torch.manual_seed(1)
    again, _ = model.validation_losses(batch, 5)
    assert torch.equal(first, again) and logs["val/loss_per_sample"].shape == (4,)
    half = {k: v[2:] for k, v in batch.items()}
    _, half_logs = model.validation_losses(half, 0)
    assert torch.allclose(half_logs["val/loss_per_sample"], logs["val/loss_per_sample"][2:], atol=1e-6)
    model.deterministic_validation = False  # CompVis's way: fresh draws
    torch.manual_seed(0)
    a, _ = model.validation_losses(batch, 0)
    b, _ = model.validation_losses(batch, 0)
    assert not torch.equal(a, b)
