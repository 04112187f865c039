"""Scaled dot-product attention that survives a PyTorch CPU kernel bug.

PyTorch 2.14's fused CPU attention for bf16/fp16 packs its operands in the AMX "VNNI" layout when
the *processor* has AMX, but dispatches the packing through the *selected* ATen kernel level: with
``ATEN_CPU_CAPABILITY=avx2`` on an AMX Xeon it raises ``pack_vnni2 is only supported when avx512 is
supported``. The math backend computes the same ``softmax(q k^T * scale) v`` (it is what SDPA uses
for every shape the fused kernels decline), so that is where such a call goes, once and for good.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_fused_low_precision_cpu_broken = False


def scaled_dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, scale=scale)``; the math backend where the fused
    low-precision CPU kernel is known to fail on this process's kernel selection."""
    global _fused_low_precision_cpu_broken
    low_precision_cpu = q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
    if low_precision_cpu and _fused_low_precision_cpu_broken:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
    try:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    except RuntimeError as err:
        if not (low_precision_cpu and "vnni" in str(err)):
            raise
        _fused_low_precision_cpu_broken = True
        warnings.warn(
            f"fused {q.dtype} CPU attention failed ({err}); using PyTorch's math attention backend "
            "for the rest of this process (same function, more memory)",
            RuntimeWarning,
            stacklevel=2,
        )
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
