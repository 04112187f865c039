"""Classifier-free guidance on the quickstart, and the seed recipe vs the modern one at equal steps.

1. The quickstart first stage (`make train-autoencoder`, reused when present).
2. Two LDMs on it, same steps and data: `experiment=quickstart` (the seed's objective: eps, L1; it
   trains with condition dropout 0.1) and `experiment=quickstart_modern` (v, MSE + min-SNR, dropout 0.1).
3. `python -m segldm.eval` of the quickstart LDM over guidance scales x samplers (DPM-Solver++ 20
   steps, DDIM 50), and of both LDMs with DDIM 50 at scale 1 and at 1.5: FID (with its bootstrap
   interval), KID, precision/recall, mIoU (with its interval), seconds of generation.
4. During training both LDMs validate every `--val-every` steps: the deterministic val/loss and the
   in-training mIoU/FID of `callbacks.generation_metrics` on the first 64 validation masks.
Writes experiments/guidance/results.{json,md}, guidance.png and curves.png. Runs whose outputs
exist are reused.

    .venv/bin/python experiments/guidance/compare.py [--samples 256] [--scales 1 1.5 2 3 5]
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
from segldm.metrics.bootstrap import interval_text

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FIRST_STAGE = ROOT / "outputs/quickstart/autoencoder/checkpoints/last.ckpt"
SEGMENTER = ROOT / "outputs/segmenters/synthetic/segmenter.ckpt"
SAMPLERS = {
    "dpm_solver++ 20": ["eval.sampler=dpm_solver++", "eval.steps=20"],
    "ddim 50": ["eval.sampler=ddim", "eval.steps=50", "eval.eta=1.0"],
}
RECIPES = {"seed (eps, L1)": "quickstart", "modern (v, min-SNR)": "quickstart_modern"}


def run(module: str, args: list[str], log: Path) -> float:
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", module, *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    if proc.returncode != 0:
        sys.exit(f"{module} {' '.join(args)} failed; see {log}")
    return time.monotonic() - started


def train(experiment: str, out: Path, val_every: int) -> Path:
    ckpt = out / experiment / "checkpoints/last.ckpt"
    if not ckpt.exists():
        (out / experiment).mkdir(parents=True, exist_ok=True)
        in_training = [  # val/loss and val/miou, val/fid at every validation
            f"trainer.val_check_interval={val_every}",
            f"callbacks.generation_metrics.every_n_steps={val_every}",
            "callbacks.generation_metrics.num_samples=64",
            f"callbacks.generation_metrics.metrics.segmentation.segmenter.ckpt={SEGMENTER}",
            f"callbacks.generation_metrics.metrics.inception.cache_dir={out / 'fid_cache'}",
        ]
        run(
            "segldm.train",
            [f"experiment={experiment}", f"hydra.run.dir={out / experiment}", *in_training],
            out / f"train_{experiment}.log",
        )
    return ckpt


def evaluate(ckpt: Path, name: str, overrides: list[str], samples: int, out: Path) -> dict:
    folder = out / "eval" / name
    if not (folder / "metrics.json").exists():
        run(
            "segldm.eval",
            [
                f"ckpt={ckpt}",
                "data=synthetic",
                f"data.validation.length={samples}",
                "eval.batch_size=32",
                f"segmenter.ckpt={SEGMENTER}",
                f"hydra.run.dir={folder}",
                *overrides,
            ],
            out / "eval" / f"{name}.log",
        )
    m = json.loads((folder / "metrics.json").read_text())
    boot = m.get("bootstrap") or {}
    return {
        "fid": m["fid"],
        "fid_interval": boot.get("fid"),
        "kid": m["kid_mean"],
        "precision": m.get("precision"),
        "recall": m.get("recall"),
        "real_halves_fid": m.get("real_halves_fid"),
        "miou": m["miou"],
        "miou_interval": boot.get("miou"),
        "miou_real": m["miou_real"],
        "first_stage_rfid": m.get("first_stage_rfid"),
        "generate_s": m["timings_s"]["generate"],
        "unet_evaluations_per_image": m["sampler"]["unet_evaluations_per_image"],
    }


CURVE_KEYS = ("val/loss", "val/loss_se", "val/miou", "val/fid")


def validation_curves(out: Path) -> dict[str, list[dict[str, float]]]:
    """Per validation of each LDM's training run (its MLflow run): step, val/loss and its standard
    error, and the in-training val/miou and val/fid."""
    from mlflow.tracking import MlflowClient

    curves = {}
    for label, experiment in RECIPES.items():
        record = out / experiment / "mlflow_run.json"
        if not record.exists():
            continue
        run = json.loads(record.read_text())
        client = MlflowClient(run["tracking_uri"])
        series = {
            key: {m.step: m.value for m in client.get_metric_history(run["run_id"], key)}
            for key in CURVE_KEYS
        }
        steps = sorted(series["val/miou"] or series["val/loss"])
        curves[label] = [
            {"step": step, **{key: series[key].get(step, float("nan")) for key in CURVE_KEYS}}
            for step in steps
        ]
    return curves


def monotone_breaks(values: list[float], higher_is_better: bool) -> int:
    """How many consecutive validations got worse (0: the curve is monotone)."""
    sign = 1 if higher_is_better else -1
    return sum(1 for a, b in zip(values, values[1:], strict=False) if sign * (b - a) < 0)


def plot_curves(curves: dict[str, list[dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for label, points in curves.items():
        steps = [p["step"] for p in points]
        axes[0].errorbar(
            steps,
            [p["val/loss"] for p in points],
            yerr=[p["val/loss_se"] for p in points],
            fmt="o-",
            capsize=3,
            label=label,
        )
        axes[1].plot(steps, [p["val/miou"] for p in points], "o-", label=label)
        axes[2].plot(steps, [p["val/fid"] for p in points], "o-", label=label)
    axes[0].set(xlabel="step", ylabel="val/loss (deterministic; own scale per recipe)")
    axes[1].set(xlabel="step", ylabel="val/miou (in-training, 64 masks)")
    axes[2].set(xlabel="step", ylabel="val/fid (in-training, 64 images)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def with_interval(value: float, interval: list[float] | None, digits: int) -> str:
    return interval_text(value, {"value": interval}, "value", digits)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for sampler in SAMPLERS:
        pts = sorted((r["scale"], r) for r in rows if r["sampler"] == sampler)
        axes[0].plot([s for s, _ in pts], [r["fid"] for _, r in pts], "o-", label=sampler)
        axes[1].plot([s for s, _ in pts], [r["miou"] for _, r in pts], "o-", label=sampler)
    axes[0].set(xlabel="guidance scale", ylabel="FID (lower is better)")
    axes[1].set(xlabel="guidance scale", ylabel="mIoU (higher is better)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--val-every", type=int, default=200, help="validation interval of the LDM runs")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 5.0])
    parser.add_argument("--out", default="outputs/guidance_compare")
    args = parser.parse_args()
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval").mkdir(exist_ok=True)
    if not FIRST_STAGE.exists():  # what `make train-autoencoder` runs
        run("segldm.train", ["experiment=quickstart_autoencoder"], out / "train_autoencoder.log")
    if not SEGMENTER.exists():  # what `make train-segmenter` runs
        run("segldm.train_segmenter", [], out / "train_segmenter.log")
    ckpts = {label: train(experiment, out, args.val_every) for label, experiment in RECIPES.items()}
    seed_ckpt = ckpts["seed (eps, L1)"]
    rows = []
    for sampler, overrides in SAMPLERS.items():
        for scale in args.scales:
            name = f"seed_{sampler.split()[0]}_{scale:g}"
            rows.append(
                {
                    "sampler": sampler,
                    "scale": scale,
                    **evaluate(
                        seed_ckpt, name, [*overrides, f"eval.guidance_scale={scale}"], args.samples, out
                    ),
                }
            )
    recipes = []
    for label, ckpt in ckpts.items():
        for scale in (1.0, 1.5):
            name = f"recipe_{RECIPES[label]}_{scale:g}"
            recipes.append(
                {
                    "recipe": label,
                    "scale": scale,
                    **evaluate(
                        ckpt, name, [*SAMPLERS["ddim 50"], f"eval.guidance_scale={scale}"], args.samples, out
                    ),
                }
            )
    curves = validation_curves(out)
    result = {
        "samples": args.samples,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "guidance": rows,
        "recipes": recipes,
        "validation": curves,
    }
    (HERE / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, HERE / "guidance.png")
    plot_curves(curves, HERE / "curves.png")
    lines = [
        "# Classifier-free guidance on the quickstart (`experiments/guidance/compare.py`)",
        "",
        f"The quickstart LDM (`experiment=quickstart`: condition dropout 0.1) on the quickstart first stage; "
        f"`python -m segldm.eval` at N = {args.samples} built-in validation scenes (FID/KID: torch-fidelity "
        f"Inception; mIoU: the trained SegNet; EMA weights). Seconds: generation of all {args.samples} images. "
        f"Machine: {result['cpu']}, {result['cores']} cores. At this N FID has a large floor and spread: "
        "read differences of a few points as noise.",
        "",
        "Brackets: 95 % paired bootstrap intervals (1000 draws; the draws' spread around the value, "
        "docs/evaluation.md). Precision/recall: torch-fidelity's, k = 3, on "
        "the Inception features.",
        "",
        "| sampler | guidance scale | FID | KID x1000 | precision | recall | mIoU | UNet evals / image | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sampler']} | {r['scale']:g} | {with_interval(r['fid'], r['fid_interval'], 1)} | "
            f"{1000 * r['kid']:.1f} | {r['precision']:.3f} | {r['recall']:.3f} | "
            f"{with_interval(r['miou'], r['miou_interval'], 3)} | {r['unet_evaluations_per_image']:.0f} | "
            f"{r['generate_s']:.0f} |"
        )
    lines += [
        "",
        f"Real images: mIoU {rows[0]['miou_real']:.3f}. Reference points at this N: FID between two halves of "
        f"the real images (N/2 each, the floor) {rows[0]['real_halves_fid']:.1f}; the first stage's rFID (the "
        f"ceiling) {rows[0]['first_stage_rfid']:.1f}.",
        "",
        "![FID and mIoU against guidance scale](guidance.png)",
        "",
        "## Seed recipe vs modern recipe, same steps and data (DDIM 50)",
        "",
        "| recipe | guidance scale | FID | KID x1000 | precision | recall | mIoU |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in recipes:
        lines.append(
            f"| {r['recipe']} | {r['scale']:g} | {with_interval(r['fid'], r['fid_interval'], 1)} | "
            f"{1000 * r['kid']:.1f} | {r['precision']:.3f} | {r['recall']:.3f} | "
            f"{with_interval(r['miou'], r['miou_interval'], 3)} |"
        )
    lines += [
        "",
        f"## During training: deterministic val/loss and in-training mIoU/FID (every {args.val_every} steps)",
        "",
        "Each validation sample keeps its timestep and noise (model.validation.deterministic), so val/loss "
        "moves only when the model does; val/miou and val/fid come from callbacks.generation_metrics (64 "
        "validation masks, one seed each, DDIM 50, EMA). The two recipes' losses are different quantities "
        "(eps L1 vs min-SNR-weighted v MSE): compare each curve with itself.",
        "",
        "![val/loss, val/miou and val/fid against step](curves.png)",
        "",
        "| recipe | step | val/loss | standard error | val/miou | val/fid |",
        "|---|---|---|---|---|---|",
    ]
    for label, points in curves.items():
        lines += [
            f"| {label} | {p['step']} | {p['val/loss']:.4f} | {p['val/loss_se']:.4f} | {p['val/miou']:.3f} | "
            f"{p['val/fid']:.1f} |"
            for p in points
        ]
    lines.append("")
    for label, points in curves.items():
        loss_breaks = monotone_breaks([p["val/loss"] for p in points], higher_is_better=False)
        miou_breaks = monotone_breaks([p["val/miou"] for p in points], higher_is_better=True)
        lines.append(
            f"- {label}: val/loss rises at {loss_breaks} of {len(points) - 1} consecutive validations, "
            f"val/miou falls at {miou_breaks} of {len(points) - 1}."
        )
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print((HERE / "results.md").read_text())


if __name__ == "__main__":
    main()
