"""Condition dropout and classifier-free guidance on masks (SDM's recipe), and their start-up errors."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import InstantiationException

from segldm.diffusion.guidance import check_guidance_scale, guided_eps
from segldm.runtime.checks import ConfigError, validate_config
from tests.conftest import TINY_DATA, TINY_FIRST_STAGE, TINY_UNET, compose_train
from tests.unit.test_ldm import tiny_ldm


def test_guided_eps_is_the_closed_form_from_one_batched_call() -> None:
    calls: list[int] = []

    def apply(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return 2.0 * x + c  # eps_cond - eps_uncond = c - uncond

    x, t = torch.randn(3, 2, 4, 4), torch.zeros(3, dtype=torch.long)
    c, uncond = torch.randn(3, 2, 4, 4), torch.zeros(3, 2, 4, 4)
    for scale in (1.5, 3.0):
        assert torch.allclose(guided_eps(apply, x, t, c, scale, uncond), 2.0 * x + scale * c, atol=1e-6)
    assert calls == [6, 6]
    assert torch.equal(guided_eps(apply, x, t, c, 1.0, uncond), 2.0 * x + c) and calls[-1] == 3


def eps_uncond_known(x: torch.Tensor) -> torch.Tensor:
    return 0.25 - x


def eps_cond_known(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return 0.5 * x + torch.tanh(3.0 * c)


def known_model(null: float):
    """apply_model(x, t, c): eps_uncond_known(x) on the rows whose condition is all ``null`` (the
    unconditional input), eps_cond_known(x, c) on the others; c a tensor or CompVis's [c_concat]."""

    def apply(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        c = c[0] if isinstance(c, list) else c
        unconditional = (c.flatten(1) == null).all(1)[:, None, None, None]
        return torch.where(unconditional, eps_uncond_known(x), eps_cond_known(x, c))

    return apply


def test_guided_eps_is_eps_u_plus_s_times_eps_c_minus_eps_u() -> None:
    """eps_u + s * (eps_c - eps_u) with a model whose conditional and unconditional outputs are known
    and unrelated (neither zero nor the other plus a constant): guided_eps itself with a non-zero
    unconditional input and with CompVis's list of concat maps, and the model's own sampler, whose
    unconditional input must be the null condition (zeros) it was trained with."""
    gen = torch.Generator().manual_seed(0)
    x, c = torch.randn(3, 2, 4, 4, generator=gen), torch.randn(3, 2, 4, 4, generator=gen)
    t = torch.full((3,), 500, dtype=torch.long)
    apply, uncond = known_model(7.0), torch.full_like(c, 7.0)
    eps_u, eps_c = eps_uncond_known(x), eps_cond_known(x, c)
    assert (eps_c - eps_u).abs().min() > 1e-3  # guidance moves every element
    for scale in (1.0, 1.5, 7.5):
        expected = eps_u + scale * (eps_c - eps_u)
        torch.testing.assert_close(guided_eps(apply, x, t, c, scale, uncond), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(
            guided_eps(apply, x, t, [c], scale, [uncond]), expected, rtol=1e-6, atol=1e-6
        )

    model = tiny_ldm(cond_drop_prob=0.1).eval()
    assert model.parameterization == "eps"  # the sampler's eps is then the guided prediction itself
    model.apply_model = known_model(0.0)  # type: ignore[method-assign]  (null_condition: zeros)
    seen: list[torch.Tensor] = []

    class OneCall:  # a sampler that evaluates the model once, at x_T, and returns that eps
        def sample(self, model_fn, x_T, alphas_cumprod, generators=None, progress=False):  # noqa: N803
            seen.append(model_fn(x_T, torch.full((x_T.shape[0],), 500, dtype=torch.long)))
            return seen[-1], {}

    model.make_sampler = lambda *args, **kwargs: OneCall()  # type: ignore[method-assign]
    z = torch.randn(2, model.channels, 8, 8, generator=gen)
    cond = torch.randn(2, model.channels, 8, 8, generator=gen)
    for scale in (1.0, 3.0):
        got = model.sample(cond, x_T=z, guidance_scale=scale, use_ema=False)
        expected = eps_uncond_known(z) + scale * (eps_cond_known(z, cond) - eps_uncond_known(z))
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert len(seen) == 2


def test_guidance_scale_below_one_is_refused_naming_the_key() -> None:
    with pytest.raises(
        ValueError, match=r"eval.guidance_scale=0.5: classifier-free guidance scale must be >= 1"
    ):
        check_guidance_scale(0.5, "eval.guidance_scale")
    check_guidance_scale(1.0, "x")


def test_dropout_draws_only_when_on_and_nulls_the_dropped_rows() -> None:
    model = tiny_ldm(cond_drop_prob=0.0).train()
    z, c = torch.randn(64, 3, 8, 8), torch.randn(64, 8, 32, 32).softmax(1)
    torch.manual_seed(3)
    plain = model(z, c)[0]
    torch.manual_seed(3)
    assert torch.equal(model(z, c)[0], plain)  # p = 0: the reference's random draws, unchanged
    dropping = tiny_ldm(cond_drop_prob=0.5).train()
    dropping.load_state_dict(model.state_dict())
    seen: list[torch.Tensor] = []
    dropping.p_losses = lambda x, cond, t: seen.append(cond) or (cond.sum(), {})  # type: ignore[method-assign]
    torch.manual_seed(3)
    dropping(z, c)
    (cond,) = seen
    dropped = cond.flatten(1).abs().sum(1) == 0
    assert 16 <= int(dropped.sum()) <= 48  # Binomial(64, 0.5)
    encoded = dropping.get_learned_conditioning(c)
    assert torch.equal(cond[~dropped], encoded[~dropped])
    assert torch.equal(dropping.null_condition(encoded), torch.zeros_like(encoded))
    dropping.eval()
    seen.clear()
    dropping(z, c)
    assert torch.equal(seen[0], encoded)  # no dropout outside training


def test_guidance_runs_batched_and_is_refused_without_dropout_unless_forced() -> None:
    model = tiny_ldm(cond_drop_prob=0.1).eval()
    seg = torch.randint(0, 8, (2, 32, 32))
    calls: list[int] = []
    hook = model.model.diffusion_model.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    plain = model.generate(seg, steps=4, eta=0.0, seeds=[1, 2])
    guided = model.generate(seg, steps=4, eta=0.0, seeds=[1, 2], guidance_scale=3.0)
    hook.remove()
    assert calls == [2] * 4 + [4] * 4 and plain.shape == guided.shape
    model.check_sampler_settings(4, None, "steps", 3.0, "guidance_scale")
    no_dropout = tiny_ldm().eval()
    with pytest.raises(
        ValueError, match=r"guidance_scale=2.0: this model was trained without condition dropout"
    ):
        no_dropout.check_sampler_settings(4, None, "steps", 2.0, "guidance_scale")
    no_dropout.check_sampler_settings(4, None, "steps", 2.0, "guidance_scale", force_guidance=True)
    with pytest.raises(
        InstantiationException, match=r"model.diffusion.cond_drop_prob=1.0 must be in \[0, 1\)"
    ):
        tiny_ldm(cond_drop_prob=1.0)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.diffusion.cond_drop_prob=1.0", r"model.diffusion.cond_drop_prob=1.0 must be in \[0, 1\)"),
        ("model.diffusion.cond_drop_prob=-0.1", r"model.diffusion.cond_drop_prob=-0.1 must be in \[0, 1\)"),
        ("model.sampler.guidance_scale=0.5", r"model.sampler.guidance_scale=0.5: classifier-free guidance"),
        ("model.sampler.guidance_scale=2.0", r"guides a model trained without condition dropout"),
    ],
)
def test_bad_dropout_and_guidance_stop_at_start_up(override: str, message: str) -> None:
    cfg = compose_train([*TINY_DATA, *TINY_FIRST_STAGE, *TINY_UNET, "paths.output_dir=/tmp/unused", override])
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)
