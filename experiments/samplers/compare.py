"""Samplers at equal quality: DDIM (200 steps, the reference inference) vs DPM-Solver++(2M) ODE and SDE
at 10-50 steps, scored by `python -m segldm.eval` (FID/KID against the real validation images, mIoU
of the trained segmenter) plus the free colour-mask accuracy of the built-in scenes.

Every setting generates the same validation masks with the same per-image seeds (image i: seed i),
so the settings differ only by the sampler. Writes experiments/samplers/results.json and results.md.

    .venv/bin/python experiments/samplers/compare.py [--ckpt outputs/quickstart/ldm_std/checkpoints/last.ckpt]
        [--samples 256] [--batch-size 32] [--only ddim:200:1 dpm_solver++_sde:25:1 ...]

UNet evaluations per image are counted (a forward hook on the UNet during `segldm.eval`), not taken
from the step count: logSNR spacing merges steps that round to the same timestep (50 -> 49).
`--recount` recounts them for the rows already in results.json by running each sampler on the
quickstart LDM config (the count depends on sampler, steps and noise schedule, not on weights).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
REFERENCE = "ddim:200:1"
SETTINGS = [
    REFERENCE,
    "ddim:200:0",
    "ddim:25:1",
    "ddim:25:0",
    "dpm_solver++:10:0",
    "dpm_solver++:15:0",
    "dpm_solver++:20:0",
    "dpm_solver++:25:0",
    "dpm_solver++_sde:10:1",
    "dpm_solver++_sde:15:1",
    "dpm_solver++_sde:20:1",
    "dpm_solver++_sde:25:1",
    "dpm_solver++_sde:50:1",
]


def parse(setting: str) -> tuple[str, int, float]:
    name, steps, eta = setting.split(":")
    return name, int(steps), float(eta)


def tag(setting: str) -> str:
    name, steps, eta = parse(setting)
    return f"{name.replace('+', 'p')}_{steps}_eta{eta:g}"


def colour_accuracy(out_dir: Path, samples: int) -> float:
    """Mean share of pixels whose nearest class colour is their mask's class (built-in scenes only)."""
    from segldm.data.synthetic import SyntheticScenes, nearest_color_labels

    val = SyntheticScenes(size=64, length=samples, seed=1, one_hot=False)
    scores = []
    for i in range(samples):
        image = np.asarray(Image.open(out_dir / "generated" / f"val_{i:05d}.png").convert("RGB"))
        scores.append(float((nearest_color_labels(image) == val.scene(i)[1]).mean()))
    return float(np.mean(scores))


def run_eval(setting: str, ckpt: str, samples: int, batch_size: int, out_root: Path) -> dict:
    name, steps, eta = parse(setting)
    out_dir = out_root / tag(setting)
    if not (out_dir / "metrics.json").exists():
        args = [
            sys.executable, "-m", "segldm.eval", f"ckpt={ckpt}", "data=synthetic",
            f"data.validation.length={samples}", f"eval.sampler={name}", f"eval.steps={steps}",
            f"eval.eta={eta}", f"eval.batch_size={batch_size}", "eval.log_to_source_run=false",
            "logger=none", f"hydra.run.dir={out_dir}",
        ]  # fmt: skip
        started = time.time()
        subprocess.run(args, cwd=ROOT, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
        print(f"{setting}: {time.time() - started:.0f} s", flush=True)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    return {
        "setting": setting,
        "sampler": name,
        "steps": steps,
        "eta": eta,
        "unet_evaluations_per_image": metrics["sampler"]["unet_evaluations_per_image"],
        "fid": metrics["fid"],
        "kid_mean": metrics["kid_mean"],
        "miou": metrics["miou"],
        "pixel_accuracy": metrics["pixel_accuracy"],
        "miou_real": metrics["miou_real"],
        "colour_accuracy": colour_accuracy(out_dir, samples),
        "generate_s": metrics["timings_s"]["generate"],
        "load_average_after": list(os.getloadavg()),
        "output_dir": str(out_dir),
    }


def count_unet_evaluations(setting: str) -> float:
    """UNet forwards per image of `setting` on the quickstart LDM config (random weights, one mask)."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import segldm  # noqa: F401  (config resolvers)

    name, steps, eta = parse(setting)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            [
                "experiment=quickstart",
                "model.first_stage.ckpt_path=null",
                "model.require_pretrained_first_stage=false",
            ],
        )
    model = instantiate(cfg.model).eval()
    calls: list[int] = []
    model.model.diffusion_model.register_forward_hook(lambda m, i, o: calls.append(int(o.shape[0])))
    labels = torch.zeros(1, cfg.data.size, cfg.data.size, dtype=torch.long)
    cond = model.get_learned_conditioning(labels)
    model.sample(cond, steps=steps, eta=eta, sampler=name)
    return sum(calls) / 1.0


def write_tables(rows: list[dict], args: argparse.Namespace, machine: dict | None = None) -> None:
    ref = next(r for r in rows if r["setting"] == REFERENCE)
    for r in rows:
        r["fid_vs_reference"] = r["fid"] / ref["fid"] - 1
        r["miou_vs_reference"] = r["miou"] - ref["miou"]
        r["within_5pct_fid_and_0.02_miou"] = (
            abs(r["fid_vs_reference"]) <= 0.05 and abs(r["miou_vs_reference"]) <= 0.02
        )
    out = {
        "checkpoint": args.ckpt,
        "samples": args.samples,
        "reference": REFERENCE,
        "machine": machine or {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "rows": rows,
    }
    (HERE / "results.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [
        "# Samplers at equal quality (`experiments/samplers/compare.py`)",
        "",
        f"Checkpoint `{args.ckpt}` (quickstart LDM, scale_by_std, EMA weights); the first {args.samples} "
        "built-in validation masks, image i seeded with i in every setting; scored by `python -m segldm.eval` "
        "(FID/KID: torch-fidelity Inception against the real validation images; mIoU: the trained SegNet) "
        "and the colour-mask accuracy of the built-in scenes. Reference: DDIM 200 steps, eta 1 (CompVis inference).",
        f"FID over {args.samples} images is biased upwards and noisy (compare rows, not papers); 'seconds' is the "
        "generation wall time on the shared 2-core CPU box (load after each run in results.json); UNet "
        "evaluations per image (counted) is the load-free cost.",
        "",
        "| sampler | steps | eta | UNet evals/image | FID | FID vs ref | mIoU | mIoU vs ref | colour acc. | seconds | within 5% FID and 0.02 mIoU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sampler']} | {r['steps']} | {r['eta']:g} | {r['unet_evaluations_per_image']:g} | {r['fid']:.2f} | "
            f"{100 * r['fid_vs_reference']:+.1f}% | {r['miou']:.4f} | {r['miou_vs_reference']:+.4f} | "
            f"{r['colour_accuracy']:.3f} | {r['generate_s']:.0f} | {'yes' if r['within_5pct_fid_and_0.02_miou'] else 'no'} |"
        )
    lines += ["", f"Real images: mIoU {ref['miou_real']:.4f} (the segmenter's ceiling)."]
    (HERE / "results.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ckpt", default="outputs/quickstart/ldm_std/checkpoints/last.ckpt")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="outputs/samplers")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument(
        "--recount", action="store_true", help="recount UNet evaluations of results.json's rows"
    )
    args = parser.parse_args()
    if args.recount:
        stored = json.loads((HERE / "results.json").read_text())
        for row in stored["rows"]:
            row["unet_evaluations_per_image"] = count_unet_evaluations(row["setting"])
        args.ckpt, args.samples = stored["checkpoint"], stored["samples"]
        write_tables(stored["rows"], args, stored.get("machine"))  # the machine the evaluations ran on
        print((HERE / "results.md").read_text())
        return
    settings = args.only or SETTINGS
    if REFERENCE not in settings:
        settings = [REFERENCE, *settings]
    rows = [run_eval(s, args.ckpt, args.samples, args.batch_size, ROOT / args.out) for s in settings]
    write_tables(rows, args)
    print((HERE / "results.md").read_text())


if __name__ == "__main__":
    main()
