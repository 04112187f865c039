"""The quality/alignment front of the quickstart LDM: one Hydra multirun of `python -m segldm.eval` over
guidance scales x samplers x steps, then `python -m segldm.report <multirun folder>` (FID vs mIoU with both
bootstrap intervals, Pareto front starred), copied into experiments/front/ with results.md.

Needs the quickstart model and its segmenter (`make train`, `make train-segmenter`) and the offline
Inception weights (`make fid-weights`). A multirun whose jobs all wrote metrics.json is reused (delete
outputs/experiments/front to measure again).

    flock /tmp/segldm-cpu.lock .venv/bin/python experiments/front/run.py [--samples 128]
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from segldm.config.hardware import cpu_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LDM = ROOT / "outputs/quickstart/ldm/checkpoints/last.ckpt"
SEGMENTER = ROOT / "outputs/segmenters/synthetic/segmenter.ckpt"
SWEEP = ROOT / "outputs/experiments/front/multirun"
GRID = {"eval.guidance_scale": "1,1.5,2,3", "eval.sampler": "ddim,dpm_solver++", "eval.steps": "10,25"}


def multirun_command(samples: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "segldm.eval",
        "-m",
        f"ckpt={LDM.relative_to(ROOT)}",
        "data=synthetic",
        f"data.validation.length={samples}",
        "eval.batch_size=32",
        "eval.eta=0.0",  # DDIM deterministic at every step count (DPM-Solver++ takes no eta)
        f"segmenter.ckpt={SEGMENTER.relative_to(ROOT)}",
        "logger=none",
        "metrics.inception.first_stage_rfid=false",  # the rFID ceiling: a third of Inception's time, not shown here
        *(f"{key}={values}" for key, values in GRID.items()),
        f"hydra.sweep.dir={SWEEP.relative_to(ROOT)}",
    ]


def jobs_expected() -> int:
    count = 1
    for values in GRID.values():
        count *= len(values.split(","))
    return count


def spread_line(metrics: list[dict]) -> str:
    """How far apart the runs are, beside how wide each run's own interval is (what the front can resolve)."""
    parts = []
    for key, digits in (("fid", 1), ("miou", 3)):
        values = [m[key] for m in metrics]
        widths = [m["bootstrap"][key][1] - m["bootstrap"][key][0] for m in metrics if m["bootstrap"].get(key)]
        parts.append(
            f"{key} spans {min(values):.{digits}f} to {max(values):.{digits}f} across the runs, and one run's interval "
            f"is {min(widths):.{digits}f} to {max(widths):.{digits}f} wide"
        )
    return (
        "Reading: "
        + "; ".join(parts)
        + " (a difference smaller than the intervals is not resolved at this N)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=128, help="built-in validation scenes per evaluation")
    args = parser.parse_args()
    for path, how in ((LDM, "make train"), (SEGMENTER, "make train-segmenter")):
        if not path.is_file():
            sys.exit(f"{path} is missing: run `{how}` first")
    command = multirun_command(args.samples)
    done = list(SWEEP.glob("*/metrics.json"))
    took = None
    if len(done) < jobs_expected():
        shutil.rmtree(SWEEP, ignore_errors=True)
        SWEEP.mkdir(parents=True)
        started = time.monotonic()
        with (SWEEP.parent / "multirun.log").open("w") as log:
            proc = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            sys.exit(f"the eval multirun failed; see {SWEEP.parent / 'multirun.log'}")
        took = time.monotonic() - started
    report = subprocess.run(
        [sys.executable, "-m", "segldm.report", str(SWEEP.relative_to(ROOT))],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if report.returncode != 0:
        sys.exit(f"segldm.report failed:\n{report.stdout}\n{report.stderr}")
    for name in ("front.png", "front.md"):
        shutil.copyfile(SWEEP / "report" / name, HERE / name)
    metrics = [json.loads(p.read_text()) for p in sorted(SWEEP.glob("*/metrics.json"))]
    first = metrics[0]
    seconds = sum(m["timings_s"]["total"] for m in metrics)
    front_md = (HERE / "front.md").read_text().split("\n", 1)[1].strip()
    lines = [
        "# Quality / alignment front of the quickstart LDM (`experiments/front/run.py`)",
        "",
        f"The quickstart LDM (`make train`), {len(metrics)} evaluations (guidance scale x sampler x steps), each at N = "
        f"{first['num_samples']} built-in validation scenes ({first['data']['size']} px), seeds "
        f"{first['protocol_card']['seed_range']} (the same for every run), EMA, DDIM with eta 0. FID: torch-fidelity "
        "Inception (offline weights, `make fid-weights`); mIoU: the trained SegNet (`make train-segmenter`; real "
        f"images: {first['miou_real']:.3f}). Machine: {cpu_model()}, OMP_NUM_THREADS=1 (2 cores shared with other jobs); "
        f"{seconds / 60:.1f} min of evaluation in all"
        + (f" ({took / 60:.1f} min wall for the multirun)." if took else "."),
        "",
        "Command (the multirun, then the report of its folder):",
        "",
        "```",
        " ".join(shlex.quote(part) for part in ["python", *command[1:]]),
        f"python -m segldm.report {SWEEP.relative_to(ROOT)}",
        "```",
        "",
        spread_line(metrics),
        "",
        front_md.replace("# Quality / alignment front", "## Quality / alignment front", 1),
        "",
    ]
    (HERE / "results.md").write_text("\n".join(lines))
    print(report.stdout)
    print((HERE / "results.md").read_text())


if __name__ == "__main__":
    main()
