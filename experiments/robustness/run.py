"""Mask robustness of the quickstart LDM: FID and mIoU when generation is conditioned on perturbed masks
(SCDM's noisy-mask benchmark and three more), every metric scored against the clean masks.

Needs the quickstart model and its segmenter (`make train`, `make train-segmenter`) and the offline
Inception weights (`make fid-weights`). One `python -m segldm.eval` per perturbation (and one clean) at N
built-in validation scenes, all with the same seeds; writes experiments/robustness/results.md. Runs whose
metrics.json exists are reused (delete outputs/experiments/robustness to measure again).

    flock /tmp/segldm-cpu.lock .venv/bin/python experiments/robustness/run.py [--samples 256]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from segldm.config.hardware import cpu_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LDM = ROOT / "outputs/quickstart/ldm/checkpoints/last.ckpt"
SEGMENTER = ROOT / "outputs/segmenters/synthetic/segmenter.ckpt"
OUT = ROOT / "outputs/experiments/robustness"
OBJECTS = "[1,4,7]"  # the built-in scenes' objects: cloud, tree, sun

# name -> eval overrides. SCDM's three keep SCDM's pixel parameters (made for 256 px masks; the built-in
# scenes are 64 px, so each covers a larger share of the image) with fill=random: the built-in data
# has no ignore label to stand for SCDM's "unlabeled" (ADE20K id 0).
PERTURBATIONS: dict[str, list[str]] = {
    "clean": [],
    "SCDM DS (factor 4)": ["eval/mask_perturbation=scdm_ds"],
    "SCDM Edge (radius 2, fill random)": [
        "eval/mask_perturbation=scdm_edge",
        "eval.mask_perturbation.fill=random",
    ],
    "SCDM Random (p 0.1, fill random)": [
        "eval/mask_perturbation=scdm_random",
        "eval.mask_perturbation.fill=random",
    ],
    "erode objects k=2": ["eval/mask_perturbation=erode", f"eval.mask_perturbation.classes={OBJECTS}"],
    "dilate objects k=2": ["eval/mask_perturbation=dilate", f"eval.mask_perturbation.classes={OBJECTS}"],
    "swap 25 % of regions": ["eval/mask_perturbation=swap_regions", "eval.mask_perturbation.fraction=0.25"],
}


def folder_of(name: str) -> Path:
    """outputs/experiments/robustness/<name in letters, digits and _> (a Hydra override takes no '=')."""
    short = name.split(" (")[0].lower().replace("%", "pct")
    return OUT / "".join(c if c.isalnum() else "_" for c in short)


def eval_command(folder: Path, overrides: list[str], samples: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "segldm.eval",
        f"ckpt={LDM.relative_to(ROOT)}",
        "data=synthetic",
        f"data.validation.length={samples}",
        "eval.batch_size=32",
        f"segmenter.ckpt={SEGMENTER.relative_to(ROOT)}",
        "logger=none",
        "metrics.inception.first_stage_rfid=false",  # the rFID ceiling: a third of Inception's time, not shown here
        f"hydra.run.dir={folder.relative_to(ROOT)}",
        *overrides,
    ]


def evaluate(name: str, overrides: list[str], samples: int) -> dict:
    folder = folder_of(name)
    command = eval_command(folder, overrides, samples)
    if not (folder / "metrics.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "eval.log").open("w") as log:
            proc = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            sys.exit(f"{name}: segldm.eval failed; see {folder / 'eval.log'}")
    return json.loads((folder / "metrics.json").read_text())


def interval(m: dict, key: str, digits: int) -> str:
    value, bounds = m.get(key), (m.get("bootstrap") or {}).get(key)
    if value is None:
        return "–"
    return f"{value:.{digits}f}" + (f" [{bounds[0]:.{digits}f}, {bounds[1]:.{digits}f}]" if bounds else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=256, help="built-in validation scenes per evaluation")
    args = parser.parse_args()
    for path, how in ((LDM, "make train"), (SEGMENTER, "make train-segmenter")):
        if not path.is_file():
            sys.exit(f"{path} is missing: run `{how}` first")
    results = {}
    for name, overrides in PERTURBATIONS.items():
        print(f"{name} ...", flush=True)
        results[name] = evaluate(name, overrides, args.samples)
    clean = results["clean"]
    rows = []
    for name, m in results.items():
        card = m["protocol_card"]
        perturbation = m.get("mask_perturbation")
        delta_fid = "" if m is clean else f"{m['fid'] - clean['fid']:+.1f}"
        delta_miou = "" if m is clean else f"{m['miou'] - clean['miou']:+.3f}"
        rows.append(
            f"| {name} | {json.dumps(perturbation['params']) if perturbation else '–'} | {interval(m, 'fid', 1)} | "
            f"{delta_fid} | {interval(m, 'miou', 3)} | {delta_miou} | `{card['card_key']}` | "
            f"{m['timings_s'].get('total', '–')} |"
        )
    s = clean["sampler"]
    boot = clean["bootstrap"]
    command = " ".join(
        shlex.quote(part)
        for part in eval_command(OUT / "<name>", ["<perturbation overrides>"], args.samples)[1:]
    )
    lines = [
        "# Mask robustness of the quickstart LDM (`experiments/robustness/run.py`)",
        "",
        f"The quickstart LDM (`make train`), N = {clean['num_samples']} built-in validation scenes "
        f"({clean['data']['size']} px), {s['name']} {s['steps']} steps, eta {s['eta']}, guidance {s['guidance_scale']}, "
        f"EMA {s['use_ema']}, seeds {clean['protocol_card']['seed_range']} (the same for every row). Generation is "
        "conditioned on the perturbed masks; FID (torch-fidelity Inception, offline weights) and mIoU (the trained "
        "SegNet, `make train-segmenter`) are scored against the clean masks and real images. "
        f"Machine: {cpu_model()}, OMP_NUM_THREADS=1 (2 cores shared with other jobs: the seconds are upper bounds).",
        "",
        f"Brackets: {100 * boot['level']:.0f} % paired bootstrap intervals of each run ({boot['draws']} draws over "
        "the N samples). Deltas are against the clean row: same masks, same seeds, so the runs are paired, but the "
        "intervals are each run's own, not of the difference.",
        "",
        "Perturbations (segldm/pipeline/mask_perturbations.py, presets conf/eval/mask_perturbation/): SCDM's DS, Edge "
        "and Random (mlvlab/SCDM image_process/{downsample,edge,random}.py) with SCDM's pixel parameters, made for "
        "256 px masks, on 64 px ones (a band of radius 2 and a 16x16 DS grid cover 4x the image share they cover at "
        "256 px); the built-in data has no ignore label, so the pixels SCDM sets to unlabeled take a random other "
        f"class (fill=random). Erode/dilate move the objects' (cloud, tree, sun: classes {OBJECTS}) boundaries by 2 px; "
        "swap gives 25 % of each mask's connected regions (rounded half up) a random wrong class.",
        "",
        "| perturbation | params | FID | ΔFID | mIoU | ΔmIoU | card key | seconds |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Real images against the clean masks: mIoU {clean['miou_real']:.3f}. Every perturbed row has its own protocol "
        "card key (the perturbation is on the card), so no report puts it beside clean numbers by mistake. Seconds: "
        "the whole eval; the first row run also fills the real images' Inception-feature cache the others read."
        + (
            f" The clean row also measured the first stage's rFID ceiling ({clean['first_stage_rfid']:.1f}; run "
            "before the `first_stage_rfid=false` switch was added, which changes neither FID nor mIoU)."
            if clean.get("first_stage_rfid") is not None
            else ""
        ),
        "",
        "Command (one per row; the perturbation overrides are the presets named above, e.g. "
        "`eval/mask_perturbation=scdm_edge eval.mask_perturbation.fill=random`):",
        "",
        "```",
        f"python {command}",
        "```",
        "",
        f"Rerun everything: `flock /tmp/segldm-cpu.lock .venv/bin/python experiments/robustness/run.py --samples {args.samples}`",
        "",
    ]
    (HERE / "results.md").write_text("\n".join(lines))
    print((HERE / "results.md").read_text())


if __name__ == "__main__":
    main()
