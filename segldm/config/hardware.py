"""What the machine offers that the config picks from: native bf16 on this CPU or GPU.

bf16 autocast pays only where the hardware computes in bf16 natively (CPUs with AVX512-BF16 or AMX,
GPUs of compute capability >= 8.0); elsewhere it is emulated and slower than fp32. `trainer.precision`
defaults to ``${segldm.auto_precision:${.accelerator}}``, which asks :func:`auto_precision`.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

CPU_FLAGS = ("avx2", "avx512_f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_capability() -> dict[str, Any]:
    """torch's own CPU feature probe (cpuinfo), or /proc/cpuinfo flags where it is unavailable."""
    try:
        return dict(torch._C._cpu._get_cpu_capability())
    except (AttributeError, RuntimeError):
        flags: set[str] = set()
        name = platform.processor()
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.exists():
            for line in cpuinfo.read_text().splitlines():
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                elif line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
        return {"cpu_name": name, **{f: f.replace("avx512_f", "avx512f") in flags for f in CPU_FLAGS}}


def cpu_has_native_bf16() -> bool:
    """True where bf16 matmuls/convs run natively on the CPU (AVX512-BF16 or AMX); elsewhere bf16
    autocast is emulated and slower than fp32, so it is never the CPU default there."""
    caps = cpu_capability()
    return any(caps.get(flag) for flag in BF16_CPU_FLAGS)


def resolve_accelerator(accelerator: str) -> str:
    """Lightning's accelerator name -> 'cuda', 'cpu' or 'mps' (`auto`: CUDA when available)."""
    name = str(accelerator).lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if name in ("gpu", "cuda") else name


def native_bf16(accelerator: str) -> tuple[bool, str]:
    """(whether `accelerator` computes bf16 natively, why), for the start-up message."""
    device = resolve_accelerator(accelerator)
    if device == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        name = torch.cuda.get_device_name()
        major, minor = torch.cuda.get_device_capability()
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{name} (sm {major}.{minor}) {'has' if ok else 'lacks'} native bf16"
    if device == "cpu":
        caps = cpu_capability()
        flags = [f for f in BF16_CPU_FLAGS if caps.get(f)]
        cpu = caps.get("cpu_name") or platform.processor() or "this CPU"
        if flags:
            return True, f"{cpu} has native bf16 ({', '.join(flags)})"
        return (
            False,
            f"{cpu} has no native bf16 ({' / '.join(BF16_CPU_FLAGS)}): bf16 would be emulated, slower than fp32",
        )
    return False, f"accelerator {device}: bf16 autocast is not picked automatically there"


def auto_precision(accelerator: str = "auto") -> str:
    """Lightning's `precision` for `accelerator`: bf16 autocast where native, fp32 elsewhere (the
    loss, latents and VQ distances stay fp32 either way)."""
    return "bf16-mixed" if native_bf16(accelerator)[0] else "32-true"


def precision_message(trainer_cfg: DictConfig) -> str:
    """The start-up line saying which precision the run uses and, when it was picked automatically, why."""
    chosen = str(trainer_cfg.precision)
    raw = OmegaConf.to_container(trainer_cfg, resolve=False).get("precision")  # type: ignore[union-attr]
    if isinstance(raw, str) and "segldm.auto_precision" in raw:
        _, why = native_bf16(str(trainer_cfg.get("accelerator", "auto")))
        return f"precision: {chosen} (picked automatically: {why}; pin it with trainer.precision=...)"
    return f"precision: {chosen} (trainer.precision)"


def cpu_model() -> str:
    """The CPU's full model name (/proc/cpuinfo), for results that must say where they were measured."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
