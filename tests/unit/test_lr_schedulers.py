import pytest
import torch

from segldm.training.lr_schedulers import ConstantScheduler, CosineScheduler, LambdaLinearScheduler
from tests.compvis_fixtures import load_io, model_fixture_dirs

SEED = dict(warm_up_steps=[10000], cycle_lengths=[10000000000000], f_start=[1e-6], f_max=[1.0], f_min=[1.0])


def test_lambda_linear_seed_warmup_closed_form():
    f = LambdaLinearScheduler(**SEED)
    assert f(0) == pytest.approx(1e-6)
    assert f(5000) == pytest.approx(1e-6 + (1 - 1e-6) * 0.5)
    assert f(10000) == pytest.approx(1.0)
    assert f(10**6) == pytest.approx(1.0)


def test_lambda_linear_accepts_scalars_for_sweeps():
    f = LambdaLinearScheduler(warm_up_steps=100, cycle_lengths=1e13, f_start=0.0, f_max=1.0, f_min=1.0)
    assert f(50) == pytest.approx(0.5)


def test_lambda_linear_decay_after_warmup_and_list_length_check():
    f = LambdaLinearScheduler(
        warm_up_steps=[10], cycle_lengths=[110], f_start=[0.0], f_max=[1.0], f_min=[0.0]
    )
    assert f(60) == pytest.approx((110 - 60) / 110)
    with pytest.raises(ValueError, match="one entry per cycle"):
        LambdaLinearScheduler(warm_up_steps=[1, 2], cycle_lengths=[10], f_start=[0], f_max=[1], f_min=[1])


def test_cosine_and_constant():
    f = CosineScheduler(warm_up_steps=10, max_steps=110, f_start=0.0, f_min=0.0)
    assert f(0) == 0.0 and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0, abs=1e-12)
    g = ConstantScheduler(warm_up_steps=4, f_start=0.0)
    assert [g(i) for i in range(6)] == pytest.approx([0, 0.25, 0.5, 0.75, 1, 1])


def test_scheduler_steps_lambda_lr_per_optimizer_step():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, LambdaLinearScheduler(**{**SEED, "warm_up_steps": [4]}))
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(2e-6) and lrs[2] == pytest.approx(2 * (1e-6 + (1 - 1e-6) * 0.5))
    assert lrs[4:] == pytest.approx([2.0, 2.0])


@pytest.mark.parametrize("folder", model_fixture_dirs(), ids=lambda p: p.name)
def test_matches_reference_factors(folder):
    io = load_io(folder)
    f = LambdaLinearScheduler(**SEED)
    got = [f(int(s)) for s in io["lr_sched/steps"]]
    assert got == pytest.approx(io["lr_sched/factors"].tolist(), rel=1e-12)
