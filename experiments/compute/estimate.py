"""Compute estimate of the benchmark presets (experiment=ade20k_256, cocostuff_256, cityscapes_512x256,
celebamask_hq_256) on one modern GPU, from FLOPs: no GPU run of them exists yet (`make bench-gpu` has
not run on a device), so this is an estimate and says so.

For each preset: the FLOPs of one training image (the frozen VQ-f4 encoder forward, the cond stage,
the UNet forward and backward), counted by torch.utils.flop_counter on the real modules at the
preset's sizes, and of one DDIM sampling step (UNet forward) and one decode. Images/s and GPU-hours
follow from a card's dense bf16 peak times an assumed model-FLOPs utilisation (MFU).

    .venv/bin/python experiments/compute/estimate.py  # -> experiments/compute/results.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.flop_counter import FlopCounterMode

import segldm  # noqa: F401  (resolvers)
from segldm.config.hardware import cpu_model
from segldm.models.autoencoder import Encoder

REPO = Path(__file__).resolve().parents[2]
PRESETS = ("ade20k_256", "cocostuff_256", "cityscapes_512x256", "celebamask_hq_256")
CARD, PEAK_TFLOPS = "H100 SXM", 989.4  # dense bf16 (experiments/bench/segldm_bench/machine.py)
ASSUMED_MFU = (0.15, 0.40)  # a range, not a measurement: convolution UNets in bf16 at batch 8-16


def config(preset: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[f"experiment={preset}", "data.root=/unused", "paths.output_dir=/tmp/unused"],
        )


def flops_of(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def image_shape(cfg) -> tuple[int, int]:
    """(height, width) of a training image: data.size is the short side; Cityscapes-like data is 2:1."""
    size = int(cfg.data.size)
    aspect = float(cfg.data.get("aspect", 1.0) or 1.0)
    return size, int(round(size * aspect))


def measure(preset: str) -> dict[str, float]:
    cfg = config(preset)
    height, width = image_shape(cfg)
    factor = 2 ** (len(cfg.model.first_stage.ddconfig.ch_mult) - 1)
    unet = instantiate(cfg.model.unet)
    cond_stage = instantiate(cfg.model.cond_stage)
    first = cfg.model.first_stage
    encoder_cfg = dict(first.ddconfig)
    encoder = Encoder(**encoder_cfg)
    latent = torch.randn(1, int(cfg.model.channels), height // factor, width // factor)
    cond = torch.randn(1, int(cond_stage.in_channels), height, width)
    image = torch.randn(1, 3, height, width)
    t = torch.tensor([500])

    def unet_train() -> None:
        c = cond_stage(cond)
        out = unet(torch.cat([latent, c], 1), t)
        out.float().abs().mean().backward()

    def unet_forward() -> None:
        with torch.no_grad():
            unet(torch.cat([latent, cond_stage(cond)], 1), t)

    def encode() -> None:
        with torch.no_grad():
            encoder(image)

    train = flops_of(unet_train) + flops_of(encode)
    step = flops_of(unet_forward)
    return {
        "height": height,
        "width": width,
        "channels": int(cond_stage.in_channels),
        "batch": int(cfg.data.batch_size),
        "steps": int(cfg.trainer.max_steps),
        "train_gflops": train / 1e9,
        "sample_step_gflops": step / 1e9,
        "ddim_steps": int(cfg.model.sampler.steps),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "experiments/compute/results.md"))
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for preset in PRESETS:
        print(f"counting {preset} ...", flush=True)
        rows.append((preset, measure(preset)))
    lines = [
        "# Compute estimate of the benchmark presets (from FLOPs, not measured on a GPU)",
        "",
        f"Written by `python experiments/compute/estimate.py` on {cpu_model()} "
        f"(torch {torch.__version__}); FLOPs are counted by `torch.utils.flop_counter` on the real modules at "
        "each preset's sizes (batch 1), so they do not depend on the CPU. Throughput assumes "
        f"{CARD} dense bf16 peak {PEAK_TFLOPS} TFLOPS at {ASSUMED_MFU[0]:.0%}-{ASSUMED_MFU[1]:.0%} model-FLOPs "
        "utilisation: an assumption until `make bench-gpu` measures the seed UNet on a device.",
        "",
        "| preset | image | cond channels | batch | steps | train GFLOPs / image | train images/s | GPU-hours "
        "| DDIM-200 sampling s / image |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for preset, m in rows:
        rates = [PEAK_TFLOPS * 1e3 * mfu / m["train_gflops"] for mfu in ASSUMED_MFU]
        images = m["steps"] * m["batch"]
        hours = [images / rate / 3600 for rate in rates]
        sample_s = [
            m["ddim_steps"] * m["sample_step_gflops"] / (PEAK_TFLOPS * 1e3 * mfu) for mfu in ASSUMED_MFU
        ]
        lines.append(
            f"| `experiment={preset}` | {m['width']}x{m['height']} | {m['channels']} | {m['batch']} | "
            f"{m['steps']:,} | {m['train_gflops']:.0f} | {rates[0]:.0f}-{rates[1]:.0f} | "
            f"{hours[1]:.1f}-{hours[0]:.1f} | {sample_s[1]:.3f}-{sample_s[0]:.3f} |"
        )
    lines += [
        "",
        "Train GFLOPs per image: VQ-f4 encoder forward + cond stage + UNet forward and backward; the optimizer,",
        "EMA and data loading are not counted (they add little FLOPs but real time). Sampling: 200 UNet",
        "forwards without guidance (x2 with guidance_scale > 1), decoding not counted.",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
