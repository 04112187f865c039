"""trainer.precision picked from the hardware: bf16 autocast only where it is native, said at start-up."""

from __future__ import annotations

import pytest

from segldm.config import hardware
from tests.conftest import compose_train

AMD = {"cpu_name": "AMD EPYC 7B13", "avx2": True, "avx512_f": False, "avx512_bf16": False, "amx_bf16": False}
XEON = {
    "cpu_name": "Intel Xeon Platinum",
    "avx2": True,
    "avx512_f": True,
    "avx512_bf16": True,
    "amx_bf16": True,
}


@pytest.fixture
def cpu(monkeypatch):
    def set_cpu(caps):
        monkeypatch.setattr(hardware, "cpu_capability", lambda: dict(caps))
        monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: False)

    return set_cpu


def test_cpu_without_native_bf16_stays_fp32(cpu):
    cpu(AMD)
    assert hardware.auto_precision("cpu") == "32-true"
    assert hardware.auto_precision("auto") == "32-true"  # no CUDA: the CPU decides
    ok, why = hardware.native_bf16("cpu")
    assert not ok and "AMD EPYC 7B13" in why and "emulated" in why


def test_cpu_with_amx_or_avx512_bf16_autocasts(cpu):
    cpu(XEON)
    assert hardware.auto_precision("cpu") == "bf16-mixed"
    cpu({**XEON, "amx_bf16": False})
    assert hardware.auto_precision("cpu") == "bf16-mixed"
    assert "avx512_bf16" in hardware.native_bf16("cpu")[1]


def test_other_accelerators_are_not_guessed(cpu):
    cpu(XEON)
    assert hardware.auto_precision("mps") == "32-true"
    assert hardware.auto_precision("gpu") == "32-true"  # asked for CUDA where there is none


@pytest.mark.parametrize(("caps", "expected"), [(AMD, "32-true"), (XEON, "bf16-mixed")])
def test_trainer_config_resolves_and_the_start_up_line_says_why(cpu, caps, expected):
    cpu(caps)
    cfg = compose_train(["trainer=cpu", "paths.output_dir=/tmp/unused"])
    assert cfg.trainer.precision == expected
    message = hardware.precision_message(cfg.trainer)
    assert message.startswith(f"precision: {expected} (picked automatically: {caps['cpu_name']}")
    pinned = compose_train(["trainer=cpu", "trainer.precision=32-true", "paths.output_dir=/tmp/unused"])
    assert hardware.precision_message(pinned.trainer) == "precision: 32-true (trainer.precision)"
    assert compose_train(["trainer=debug", "paths.output_dir=/tmp/unused"]).trainer.precision == "32-true"
