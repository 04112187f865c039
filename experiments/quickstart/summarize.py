"""Summarise the last `make train` run: timings and losses from MLflow, and how well the final
LDM's samples follow their masks on the built-in validation scenes (nearest-colour labelling,
real images as the upper bound). Writes experiments/quickstart/quality.md and quality.png.

    .venv/bin/python experiments/quickstart/summarize.py [--root .] [--samples 32] [--steps 50]
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from mlflow.tracking import MlflowClient

from segldm.data.synthetic import SyntheticScenes, nearest_color_labels
from segldm.pipeline.visualize import colorize_labels, save_grid
from segldm.runtime.loading import load_ldm

HERE = Path(__file__).resolve().parent


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def mask_accuracy(images: np.ndarray, labels: np.ndarray) -> float:
    return float(
        np.mean([(nearest_color_labels(i) == lab).mean() for i, lab in zip(images, labels, strict=True)])
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default=".")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    root = Path(args.root).resolve()

    client = MlflowClient(f"sqlite:///{root}/outputs/mlflow.db")
    experiment = client.get_experiment_by_name("quickstart")
    rows = []
    for name in ("quickstart-autoencoder", "quickstart-ldm"):
        run = client.search_runs(
            [experiment.experiment_id],
            f"attributes.run_name = '{name}'",
            order_by=["attributes.start_time DESC"],
        )[0]
        seconds = (run.info.end_time - run.info.start_time) / 1000
        steps = int(run.data.params["trainer/max_steps"])
        metrics = {k: v for k, v in run.data.metrics.items() if k.startswith("val/")}
        rows.append((name, run.info.run_id, steps, seconds, metrics))

    model = load_ldm(root / "outputs/quickstart/ldm/checkpoints/last.ckpt").eval()
    val = SyntheticScenes(size=64, length=args.samples, seed=1)
    batch = torch.utils.data.default_collate([val[i] for i in range(len(val))])
    seg = rearrange(batch["segmentation"], "b h w c -> b c h w")
    labels = batch["label_map"].numpy().astype(np.int64)
    generated = model.generate(seg, steps=args.steps, eta=1.0, seeds=list(range(len(val))), progress=True)
    real = rearrange(batch["image"], "b h w c -> b c h w")
    recon = model.decode_first_stage(model.encode_first_stage(real))
    acc = {
        "real images (upper bound)": mask_accuracy(to_uint8(real), labels),
        "first-stage reconstructions": mask_accuracy(to_uint8(recon.clamp(-1, 1)), labels),
        f"LDM samples (DDIM {args.steps}, eta 1, EMA)": mask_accuracy(to_uint8(generated), labels),
        "chance (uniform over 8 classes)": 1 / 8,
    }
    save_grid([colorize_labels(batch["label_map"][:8], 8), generated[:8], real[:8]], HERE / "quality.png")

    lines = [
        "# Quickstart (`make train`) results",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"{platform.processor() or 'CPU'}; written by `experiments/quickstart/summarize.py`.",
        "",
        "| stage | MLflow run | steps | wall time (s) | final validation metrics |",
        "|---|---|---|---|---|",
    ]
    for name, run_id, steps, seconds, metrics in rows:
        shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
        lines.append(f"| {name} | `{run_id[:8]}` | {steps} | {seconds:.0f} | {shown} |")
    lines += [
        "",
        f"Mask following on {args.samples} validation scenes: fraction of pixels whose nearest class colour is",
        "the mask's class (segldm.data.synthetic.nearest_color_labels).",
        "",
        "| images | pixel accuracy |",
        "|---|---|",
        *[f"| {k} | {v:.3f} |" for k, v in acc.items()],
        "",
        "![mask | generated | real](quality.png)",
        "",
    ]
    (HERE / "quality.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
