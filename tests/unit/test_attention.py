"""segldm.models.attention: SDPA with a math-backend fallback for PyTorch's broken bf16 CPU kernel."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from segldm.models import attention
from tests.conftest import REPO


def qkv(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 2, 64, 16, generator=g).to(dtype) for _ in range(3))


def test_fallback_computes_the_same_attention_and_is_remembered(monkeypatch):
    monkeypatch.setattr(attention, "_fused_low_precision_cpu_broken", False)
    real = F.scaled_dot_product_attention
    calls = []

    def fused_fails_once(
        *args, **kwargs
    ):  # the error PyTorch 2.14 raises on AMX with ATEN_CPU_CAPABILITY=avx2
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("pack_vnni2 is only supported when avx512 is supported")
        return real(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", fused_fails_once)
    q, k, v = qkv(torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="math attention backend"):
        out = attention.scaled_dot_product_attention(q, k, v, scale=0.25)
    expected = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * 0.25, dim=-1) @ v.float()
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)  # bf16 operands
    assert attention._fused_low_precision_cpu_broken
    attention.scaled_dot_product_attention(q, k, v, scale=0.25)  # straight to the math backend, no warning


def test_other_errors_are_not_swallowed(monkeypatch):
    monkeypatch.setattr(attention, "_fused_low_precision_cpu_broken", False)

    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        attention.scaled_dot_product_attention(*qkv(torch.bfloat16))
    with pytest.raises(RuntimeError, match="shape mismatch"):  # fp32 never falls back
        attention.scaled_dot_product_attention(*qkv(torch.float32))


def test_bf16_attention_runs_with_the_avx2_kernels():
    """The real case, in a process with ATEN_CPU_CAPABILITY=avx2 (on AMX CPUs PyTorch's fused kernel fails)."""
    code = (
        "import torch; from segldm.models.attention import scaled_dot_product_attention as sdpa\n"
        "q = torch.randn(2, 2, 256, 32).bfloat16()\n"
        "out = sdpa(q, q, q, scale=32 ** -0.5)\n"
        "ref = torch.softmax(q.float() @ q.float().transpose(-1, -2) * 32 ** -0.5, -1) @ q.float()\n"
        "assert (out.float() - ref).abs().max() < 0.05, (out.float() - ref).abs().max()\n"
    )
    env = {"ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
