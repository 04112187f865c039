"""The quickstart's images before and after a recipe change: `python -m segldm.eval` of each given
LDM checkpoint at N = 64 (make eval's default) and N = 256 built-in validation scenes, with the
checkpoint's own sampler, the trained segmenter and the offline Inception weights. Writes
experiments/quickstart/recipes.json and recipes.md (FID and mIoU with their 95 % bootstrap
intervals, the first stage's rFID at the same N, the real-vs-real floor, seconds).

    .venv/bin/python experiments/quickstart/compare_recipes.py \
        --ckpt "before (commit abc)=path/to/old/last.ckpt" --ckpt "after=outputs/quickstart/ldm/checkpoints/last.ckpt" \
        [--samples 64 256] [--lock /tmp/segldm-cpu.lock]

A label already in recipes.json is measured again and replaced; other rows are kept.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from time_quickstart import cpu_model  # this folder (the script's own) is first on the path

from segldm.metrics.bootstrap import interval_text

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def evaluate(ckpt: Path, samples: int, lock: str | None) -> dict:
    out = Path(tempfile.mkdtemp(prefix="segldm-recipe-eval-"))
    command = [
        sys.executable, "-m", "segldm.eval", f"ckpt={ckpt}", "data=synthetic",
        f"data.validation.length={samples}", f"eval.num_samples={samples}", "logger=none",
        f"hydra.run.dir={out}",
    ]  # fmt: skip
    if lock:
        command = ["flock", lock, *command]
    started = time.monotonic()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - started
    metrics = json.loads((out / "metrics.json").read_text())
    boot = metrics.get("bootstrap") or {}
    return {
        "n": metrics["num_samples"],
        "fid": metrics["fid"],
        "fid_interval": boot.get("fid"),
        "rfid": metrics.get("first_stage_rfid"),
        "floor": metrics.get("real_halves_fid"),
        "miou": metrics["miou"],
        "miou_interval": boot.get("miou"),
        "miou_real": metrics.get("miou_real"),
        "first_stage_miou": metrics.get("first_stage_miou"),
        "sampler": metrics["sampler"],
        "global_step": metrics.get("global_step"),
        "seconds": round(seconds, 1),
    }


def with_interval(value: float | None, bounds: list[float] | None, digits: int) -> str:
    return interval_text(value, {"value": bounds}, "value", digits)


def write(rows: list[dict]) -> None:
    (HERE / "recipes.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        "# The quickstart's images, recipe by recipe (`experiments/quickstart/compare_recipes.py`)",
        "",
        "`python -m segldm.eval` of each recipe's `make train` LDM checkpoint on the built-in validation "
        "scenes, with the checkpoint's own sampler, the trained segmenter (`make train-segmenter`) and "
        "the offline Inception weights. Brackets: 95 % bootstrap intervals (docs/evaluation.md). rFID: "
        "the recipe's first stage on the same real images (the ceiling); floor: FID between two halves "
        "of the real images; mIoU ceiling: the segmenter on the first stage's reconstructions of them "
        "(measured since d81bb56; – before). Goal (issue 26): rFID <= 200, FID <= 210, mIoU >= 0.9 at N = 64.",
        "",
        "| recipe | N | FID | rFID | floor | mIoU | mIoU ceiling | real-image mIoU | sampler | seconds | CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for m in row["results"]:
            s = m["sampler"]
            lines.append(
                f"| {row['label']} | {m['n']} | {with_interval(m['fid'], m['fid_interval'], 1)} | "
                f"{with_interval(m['rfid'], None, 1)} | {with_interval(m['floor'], None, 1)} | "
                f"{with_interval(m['miou'], m['miou_interval'], 3)} | "
                f"{with_interval(m.get('first_stage_miou'), None, 3)} | {with_interval(m['miou_real'], None, 3)} | "
                f"{s['name']} {s['steps']}, eta {s['eta']}, guidance {s['guidance_scale']} | {m['seconds']:.0f} | "
                f"{row['cpu']} |"
            )
    (HERE / "recipes.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", action="append", required=True, help="label=path of an LDM checkpoint")
    parser.add_argument("--samples", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--lock", default=None, help="run each evaluation under flock on this file")
    args = parser.parse_args()
    path = HERE / "recipes.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    for spec in args.ckpt:
        label, _, ckpt = spec.partition("=")
        if not ckpt or not Path(ckpt).is_file():
            parser.error(f"--ckpt {spec!r}: expected label=<existing checkpoint file>")
        results = []
        for n in args.samples:
            print(f"== {label}: N = {n}", flush=True)
            results.append(evaluate(Path(ckpt).resolve(), n, args.lock))
            print(f"   {json.dumps(results[-1])}", flush=True)
        rows = [r for r in rows if r["label"] != label]
        rows.append({"label": label, "checkpoint": str(ckpt), "cpu": cpu_model(), "results": results})
        write(rows)
    print((HERE / "recipes.md").read_text(), flush=True)


if __name__ == "__main__":
    main()
