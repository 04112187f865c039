"""model.optimization.optimizer: AdamW (LDM) and taming's Adam (first stage) as config, the same
optimiser as the hard-coded one before, old configs and checkpoints still loading."""

from __future__ import annotations

import copy

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from segldm.compat.compvis.export import builds_an_ldm
from segldm.errors import StartupError
from segldm.training.autoencoder import VQAutoencoderModule
from segldm.training.ldm import LatentDiffusion
from segldm.training.optimizers import ADAMW, TAMING_ADAM, build_optimizer, fused_available, optimizer_factory
from segldm.training.options import group_flat_options, option_problems
from tests.conftest import TINY_DATA, TINY_FIRST_STAGE, TINY_UNET, compose_train


def params_of(seed: int = 0) -> list[nn.Parameter]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 7), nn.GroupNorm(1, 7), nn.Linear(7, 3))
    return list(net.parameters())


def steps(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], n: int = 3) -> list[torch.Tensor]:
    for step in range(n):
        optimizer.zero_grad()
        g = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()
    return [p.detach().clone() for p in params]


def test_the_ldm_config_builds_the_adamw_hard_coded_before_bit_for_bit():
    cfg = compose_train(
        ["model.require_pretrained_first_stage=false", *TINY_FIRST_STAGE, *TINY_UNET, *TINY_DATA]
    )
    assert dict(cfg.model.optimization.optimizer) == ADAMW
    model = instantiate(cfg.model)
    new_params, old_params = params_of(), params_of()
    new = model.make_optimizer(new_params, 4e-4)
    # what training/ldm.py configure_optimizers built before (fused_optimizer: true)
    old = torch.optim.AdamW(old_params, lr=4e-4, betas=(0.9, 0.999), weight_decay=0.01, fused=True)
    assert new.defaults == old.defaults and new.defaults["fused"] is True  # auto: fused on CPU
    for a, b in zip(steps(new, new_params), steps(old, old_params), strict=True):
        assert torch.equal(a, b)
    assert new.state_dict()["param_groups"] == old.state_dict()["param_groups"]


def test_a_checkpoint_optimizer_state_of_the_old_code_loads():
    old_params, new_params = params_of(), params_of()
    old = torch.optim.AdamW(old_params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01, fused=True)
    steps(old, old_params)
    new = build_optimizer(optimizer_factory(None, ADAMW, "k"), new_params, 1e-3)
    with torch.no_grad():
        for p, q in zip(new_params, old_params, strict=True):
            p.copy_(q)
    new.load_state_dict(copy.deepcopy(old.state_dict()))  # as read from a checkpoint file
    for a, b in zip(steps(new, new_params, 2), steps(old, old_params, 2), strict=True):
        assert torch.equal(a, b)


def test_old_option_layouts_move_into_the_optimizer_node():
    ldm = "segldm.training.ldm.LatentDiffusion"
    grouped = {
        "_target_": ldm,
        "optimization": {"weight_decay": 0.02, "adam_betas": [0.9, 0.99], "fused_optimizer": True},
    }
    flat = {"_target_": ldm, "weight_decay": 0.02, "adam_betas": [0.9, 0.99], "fused_optimizer": True}
    for config in (grouped, flat):
        moved = group_flat_options(config)["optimization"]["optimizer"]
        assert moved == {"weight_decay": 0.02, "betas": [0.9, 0.99], "fused": None}  # true ran fused: auto
        assert group_flat_options(group_flat_options(config)) == group_flat_options(config)  # idempotent
        factory = optimizer_factory(moved, ADAMW, "k")  # no _target_: over the default AdamW
        optimizer = build_optimizer(factory, params_of(), 1e-3)
        assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["betas"] == (0.9, 0.99)
    off = group_flat_options({"_target_": ldm, "fused_optimizer": False})["optimization"]["optimizer"]
    # false ran torch's default (fused=None: foreach where it can); passing fused=False would also disable foreach
    assert build_optimizer(optimizer_factory(off, ADAMW, "k"), params_of(), 1e-3).defaults["fused"] is None
    ae = group_flat_options(
        {"_target_": "segldm.training.autoencoder.VQAutoencoderModule", "adam_betas": [0.5, 0.9]}
    )
    assert ae["optimization"] == {"optimizer": {"betas": [0.5, 0.9]}}
    assert any("model.optimization.optimizer.weight_decay" in p for p in option_problems(grouped))


class RenamedFirstStage(VQAutoencoderModule):
    """A user's subclass under another name: its old keys are still the first stage's."""


class RenamedLDM(LatentDiffusion):
    """A user's LDM subclass: still exported as an LDM."""


def test_the_option_layout_is_the_class_s_not_its_name():
    here = "tests.unit.test_optimizers"
    ae = group_flat_options({"_target_": f"{here}.RenamedFirstStage", "adam_betas": [0.5, 0.9]})
    assert ae["optimization"] == {"optimizer": {"betas": [0.5, 0.9]}}  # the first stage's keys, not the LDM's
    ldm = group_flat_options({"_target_": f"{here}.RenamedLDM", "weight_decay": 0.02})
    assert ldm["optimization"] == {"optimizer": {"weight_decay": 0.02}}
    assert builds_an_ldm({"_target_": f"{here}.RenamedLDM"})
    assert not builds_an_ldm({"_target_": f"{here}.RenamedFirstStage"})
    assert not builds_an_ldm({"_target_": "no.such.LatentDiffusion"})  # a name alone is not the class


def test_the_autoencoder_keeps_taming_adam_and_torch_kernel_choice():
    cfg = compose_train(["model=autoencoder", *TINY_FIRST_STAGE, *TINY_DATA])
    factory = optimizer_factory(instantiate(cfg.model.optimization.optimizer), TAMING_ADAM, "k")
    new_params, old_params = params_of(), params_of()
    new = build_optimizer(factory, new_params, 1e-3)
    old = torch.optim.Adam(old_params, lr=1e-3, betas=(0.5, 0.9))  # autoencoder.py before
    assert new.defaults == old.defaults
    for a, b in zip(steps(new, new_params), steps(old, old_params), strict=True):
        assert torch.equal(a, b)


def test_any_torch_optimizer_and_the_fused_switch():
    sgd = optimizer_factory({"_target_": "torch.optim.SGD", "_partial_": True, "momentum": 0.9}, ADAMW, "k")
    assert type(build_optimizer(sgd, params_of(), 0.1)) is torch.optim.SGD
    forced = optimizer_factory({**ADAMW, "fused": True}, ADAMW, "k")
    assert build_optimizer(forced, params_of(), 0.1).defaults["fused"] is True
    assert fused_available(params_of()) and not fused_available([])
    assert not fused_available([torch.zeros(2, dtype=torch.int64)])


@pytest.mark.parametrize(
    ("change", "message"),
    [({"lr": 0.1}, "base_learning_rate"), ({"_partial_": False}, "_partial_=true")],
)
def test_an_optimizer_config_the_module_cannot_use_is_refused(change, message):
    with pytest.raises(StartupError, match=message):
        optimizer_factory({**ADAMW, **change}, ADAMW, "model.optimization.optimizer")
