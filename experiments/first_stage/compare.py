"""First stage with L1 only vs with taming's GAN loss (vs + LPIPS where VGG16 weights exist), same
steps and data (the quickstart preset), then the quickstart LDM on each: does a sharper first stage
give better samples?

For each variant: `python -m segldm.train experiment=quickstart_autoencoder model/loss=...`, then
`python -m segldm.eval` on the first stage (rFID, L1, PSNR at N validation images), then
`python -m segldm.train experiment=quickstart` on it and `python -m segldm.eval` on the LDM
(FID, mIoU with the trained segmenter, and the first stage's rFID at the same N). Runs whose
outputs exist are reused. Writes experiments/first_stage/results.json and results.md.

    .venv/bin/python experiments/first_stage/compare.py [--samples 256] [--variants l1 taming]
        [--steps 2000]   # first-stage steps (default: the preset's); the GAN still starts halfway
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from segldm.config.hardware import cpu_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
VARIANTS = {
    "l1": ["model/loss=l1", "model.l2_weight=1.0"],  # the previous quickstart recipe (L1 + L2 + codebook)
    "taming": [],  # the quickstart preset: L1 + PatchGAN (+ LPIPS if VGG16 weights exist) + codebook
}
SEGMENTER = ROOT / "outputs/segmenters/synthetic/segmenter.ckpt"


def run(module: str, args: list[str], log: Path) -> float:
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", module, *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    if proc.returncode != 0:
        sys.exit(f"{module} {' '.join(args)} failed; see {log}")
    return time.monotonic() - started


def variant(name: str, samples: int, out: Path, timings: dict, steps: int | None) -> dict:
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    ae_dir, ldm_dir = folder / "autoencoder", folder / "ldm"
    ae_ckpt, ldm_ckpt = ae_dir / "checkpoints/last.ckpt", ldm_dir / "checkpoints/last.ckpt"
    eval_data = ["data=synthetic", f"data.validation.length={samples}", "eval.batch_size=32"]
    if not ae_ckpt.exists():
        timings[f"{name}: first stage"] = run(
            "segldm.train",
            [
                "experiment=quickstart_autoencoder",
                *VARIANTS[name],
                *([f"trainer.max_steps={steps}"] if steps else []),
                f"hydra.run.dir={ae_dir}",
                f"run_name=first-stage-{name}",
            ],
            folder / "train_autoencoder.log",
        )
    if not (folder / "eval_first_stage/metrics.json").exists():
        run(
            "segldm.eval",
            [f"ckpt={ae_ckpt}", *eval_data, f"hydra.run.dir={folder / 'eval_first_stage'}"],
            folder / "eval_first_stage.log",
        )
    if not ldm_ckpt.exists():
        timings[f"{name}: LDM"] = run(
            "segldm.train",
            [
                "experiment=quickstart",
                f"model.first_stage.ckpt_path={ae_ckpt}",
                f"hydra.run.dir={ldm_dir}",
                f"run_name=ldm-{name}",
            ],
            folder / "train_ldm.log",
        )
    if not (folder / "eval_ldm/metrics.json").exists():
        run(
            "segldm.eval",
            [
                f"ckpt={ldm_ckpt}",
                *eval_data,
                f"segmenter.ckpt={SEGMENTER}",
                f"hydra.run.dir={folder / 'eval_ldm'}",
            ],
            folder / "eval_ldm.log",
        )
    first = json.loads((folder / "eval_first_stage/metrics.json").read_text())
    ldm = json.loads((folder / "eval_ldm/metrics.json").read_text())
    return {
        "variant": name,
        "overrides": VARIANTS[name],
        "first_stage_steps": first.get("global_step", steps),
        "rfid": first["rfid"],
        "l1": first["l1"],
        "psnr": first["psnr"],
        "lpips": first["lpips"],
        "ldm_fid": ldm["fid"],
        "ldm_first_stage_rfid": ldm.get("first_stage_rfid"),
        "ldm_miou": ldm["miou"],
        "miou_real": ldm["miou_real"],
        "sampler": ldm["sampler"],
        "outputs": str(folder),
    }


def segmenter_minutes() -> float | None:
    """Wall time of the segmenter's training run, from its MLflow run (outputs/mlflow.db)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{ROOT / 'outputs/mlflow.db'}")
    experiment = client.get_experiment_by_name("segmenters")
    runs = (
        client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
        if experiment
        else []
    )
    finished = [r for r in runs if r.info.end_time]
    return (finished[0].info.end_time - finished[0].info.start_time) / 60000 if finished else None


def reading(rows: list[dict]) -> str:
    """The comparison in words, from the numbers (GAN variant vs L1)."""
    by = {r["variant"]: r for r in rows}
    if not {"l1", "taming"} <= set(by):
        return "Reading: one variant only."
    l1, gan = by["l1"], by["taming"]
    change = 100 * (gan["rfid"] - l1["rfid"]) / l1["rfid"]
    return (
        f"Reading: the GAN first stage's rFID is {abs(change):.1f} % {'lower' if change < 0 else 'higher'} than "
        f"the L1 one's ({gan['rfid']:.1f} vs {l1['rfid']:.1f}; two disjoint sets of real scenes differ by the FID "
        f"floor at this N), its PSNR {gan['psnr'] - l1['psnr']:+.2f} dB (GAN texture is not pixel-aligned); "
        f"the LDM on it: FID {gan['ldm_fid']:.1f} vs {l1['ldm_fid']:.1f}, mIoU {gan['ldm_miou']:.3f} vs "
        f"{l1['ldm_miou']:.3f}. The grid shows what the numbers summarise."
    )


def write(rows: list[dict], args: argparse.Namespace, timings: dict) -> None:
    out = {
        "samples": args.samples,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "timings_s": timings,
        "rows": rows,
    }
    out["segmenter_training_min"] = segmenter_minutes()
    (HERE / "results.json").write_text(json.dumps(out, indent=1) + "\n")
    s = rows[0]["sampler"]
    lines = [
        "# First stage: L1 only vs taming's GAN loss (`experiments/first_stage/compare.py`)",
        "",
        f"Both first stages: the quickstart preset (`experiment=quickstart_autoencoder`, same data and seed), "
        f"{rows[0]['first_stage_steps']} steps each, "
        f"`l1` with `model/loss=l1` (L1 + L2 + codebook, the previous recipe), `taming` with the PatchGAN from "
        "halfway (no LPIPS: no VGG16 weights on this machine). Then the quickstart LDM on each. All metrics at "
        f"N = {args.samples} built-in validation scenes with `python -m segldm.eval` (FID: torch-fidelity "
        f"Inception, offline weights; mIoU: the trained SegNet; LDM samples {s['name']} {s['steps']} steps, "
        f"eta {s['eta']}, EMA). Machine: {out['cpu']}, {out['cores']} cores.",
        "",
        reading(rows),
        "",
        "| first stage | rFID | L1 | PSNR (dB) | LDM FID | LDM mIoU (real images) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['rfid']:.2f} | {r['l1']:.4f} | {r['psnr']:.2f} | {r['ldm_fid']:.2f} | "
            f"{r['ldm_miou']:.4f} ({r['miou_real']:.4f}) |"
        )
    if timings:
        lines += [
            "",
            "Training wall times of this invocation (s; the machine may have been shared): "
            + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
        ]
    lines += ["", "![real | " + " | ".join(r["variant"] for r in rows) + "](reconstructions.png)"]
    lines += [
        "",
        "Is the rFID difference more than the choice of images? `bootstrap_rfid.py` -> bootstrap.md.",
    ]
    if out["segmenter_training_min"] is not None:
        lines += [
            "",
            f"The mIoU segmenter (`make train-segmenter`, default config) trained in "
            f"{out['segmenter_training_min']:.1f} min (its MLflow run).",
        ]
    (HERE / "results.md").write_text("\n".join(lines) + "\n")


def write_reconstruction_grid(rows: list[dict]) -> None:
    """reconstructions.png: the real validation images, then each variant's reconstructions (a row each)."""
    from PIL import Image

    grids = [Image.open(Path(r["outputs"]) / "eval_first_stage/grid.png") for r in rows]
    width, height = grids[0].size
    half = height // 2  # each eval grid is two rows: real | reconstruction
    out = Image.new("RGB", (width, half * (1 + len(grids))), "white")
    out.paste(grids[0].crop((0, 0, width, half)), (0, 0))
    for i, grid in enumerate(grids, start=1):
        out.paste(grid.crop((0, half, width, height)), (0, half * i))
    out.save(HERE / "reconstructions.png")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=None, help="first-stage training steps")
    parser.add_argument("--out", default="outputs/first_stage_compare")
    args = parser.parse_args()
    timings: dict[str, float] = {}  # wall times of the runs this invocation trained (reused runs: none)
    if not SEGMENTER.exists():
        timings["segmenter"] = run("segldm.train_segmenter", [], ROOT / "outputs" / "train_segmenter.log")
    rows = [variant(name, args.samples, ROOT / args.out, timings, args.steps) for name in args.variants]
    write_reconstruction_grid(rows)
    write(rows, args, timings)
    print((HERE / "results.md").read_text())


if __name__ == "__main__":
    main()
