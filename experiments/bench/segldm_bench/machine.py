"""What the numbers were measured on: CPU, GPU, library versions, load; bf16 support and peaks."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from segldm.config.hardware import CPU_FLAGS, cpu_capability, cpu_has_native_bf16

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched against
# torch.cuda.get_device_name() in order (first match wins). `bench.gpu_peak_tflops` overrides.
GPU_BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4),
    ("H100 PCIe", 756.5),
    ("H100 NVL", 835.5),
    ("H100", 989.4),  # SXM (HBM3)
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
)


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast pays off on `device` (CUDA: compute capability >= 8.0)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


def gpu_bf16_peak_tflops(name: str) -> float | None:
    """The card's dense bf16 peak from :data:`GPU_BF16_PEAK_TFLOPS`, None when it is not listed."""
    for key, tflops in GPU_BF16_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


def memory_total_gib() -> float | None:
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2**20, 1)
    return None


def load_average() -> list[float] | None:
    """1/5/15-minute load averages (runnable processes; > cores means the machine was shared)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def describe_machine(device: torch.device) -> dict[str, Any]:
    """Everything a reader needs to place the numbers: hardware, versions, threads, load."""
    caps = cpu_capability()
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": caps.get("cpu_name") or platform.processor(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_flags": {f: bool(caps.get(f)) for f in CPU_FLAGS},
        "cpu_native_bf16": cpu_has_native_bf16(),
        "memory_gib": memory_total_gib(),
        "device": str(device),
        "load_average": load_average(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "bf16_peak_tflops": gpu_bf16_peak_tflops(props.name),
            "cuda": torch.version.cuda,
        }
    return info
