"""Time `make train` and the first `make eval` as a new user runs them: a fresh clone of this
repository, then the install, both quickstart stages and the first evaluation of the LDM (which
trains the segmenter and converts the Inception weights first), each timed on its own; repeated
--runs times. The evaluation's FID, the first stage's rFID and the mIoU (N = 64, the default, with
their bootstrap intervals) are read from its metrics.json. Writes experiments/quickstart/results.json
(every run appended) and results.md (the table).

    python3 experiments/quickstart/time_quickstart.py [--runs 2] [--keep]

The clone is made from the committed HEAD (uncommitted changes are not timed). Each stage's
outputs (checkpoints, sample grids, metrics.json) are checked to exist after it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BUDGET_S = 15 * 60  # make train, install included
EVAL_BUDGET_S = 10 * 60  # the first make eval after it
LDM_CKPT = "outputs/quickstart/ldm/checkpoints/last.ckpt"
STEPS = (
    ("install", ["make", ".venv/.installed"], []),
    (
        "first stage",
        ["make", "train-autoencoder"],
        [
            "outputs/quickstart/autoencoder/checkpoints/last.ckpt",
            "outputs/quickstart/autoencoder/reconstructions",
        ],
    ),
    (
        "LDM",
        ["make", "train-ldm"],
        [LDM_CKPT, "outputs/quickstart/ldm/samples"],
    ),
    ("first eval", ["make", "eval", f"CKPT={LDM_CKPT}"], ["outputs/segmenters/synthetic/segmenter.ckpt"]),
)
TRAIN_STEPS = ("install", "first stage", "LDM")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def one_run(keep: bool) -> dict:
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    workdir = Path(tempfile.mkdtemp(prefix="segldm-quickstart-"))
    clone = workdir / "segldm"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "SEGLDM_"))}
    entry: dict = {
        "commit": commit,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "steps": {},
    }
    log_path = workdir / "make_train.log"
    with log_path.open("w") as log:
        for name, command, expected in STEPS:
            print(f"== {name}: {' '.join(command)}", flush=True)
            started = time.monotonic()
            proc = subprocess.run(command, cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT)
            seconds = time.monotonic() - started
            missing = [p for p in expected if not (clone / p).exists()]
            entry["steps"][name] = {
                "seconds": round(seconds, 1),
                "returncode": proc.returncode,
                "missing": missing,
            }
            print(
                f"   {seconds:.0f} s, exit {proc.returncode}" + (f", missing {missing}" if missing else ""),
                flush=True,
            )
            if proc.returncode != 0:
                break
    entry["total_s"] = round(sum(s["seconds"] for n, s in entry["steps"].items() if n in TRAIN_STEPS), 1)
    entry["quality"] = eval_quality(clone)
    entry["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    entry["ok"] = all(s["returncode"] == 0 and not s["missing"] for s in entry["steps"].values()) and len(
        entry["steps"]
    ) == len(STEPS)
    entry["log_tail"] = log_path.read_text()[-2000:]
    if keep:
        entry["clone"] = str(clone)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return entry


def eval_quality(clone: Path) -> dict | None:
    """FID, rFID and mIoU (with intervals) of the first evaluation, from its metrics.json."""
    found = sorted((clone / "outputs" / "eval").glob("*/metrics.json"))
    if not found:
        return None
    metrics = json.loads(found[-1].read_text())
    bootstrap = metrics.get("bootstrap") or {}

    def interval(name: str) -> list[float] | None:
        bounds = bootstrap.get(name)
        return list(bounds) if bounds else None

    return {
        "n": metrics.get("num_samples"),
        "fid": metrics.get("fid"),
        "fid_interval": interval("fid"),
        "rfid": metrics.get("first_stage_rfid"),
        "miou": metrics.get("miou"),
        "miou_interval": interval("miou"),
        "miou_real": metrics.get("miou_real"),
        "first_stage_miou": metrics.get("first_stage_miou"),
    }


def quality_cell(quality: dict | None) -> str:
    if not quality:
        return "–"

    def with_interval(name: str, digits: int) -> str:
        value, bounds = quality.get(name), quality.get(f"{name}_interval")
        text = "–" if value is None else f"{value:.{digits}f}"
        return text + (f" [{bounds[0]:.{digits}f}, {bounds[1]:.{digits}f}]" if bounds else "")

    rfid, ceiling = quality.get("rfid"), quality.get("first_stage_miou")
    return (
        f"FID {with_interval('fid', 1)}, rFID {'–' if rfid is None else f'{rfid:.1f}'}, "
        f"mIoU {with_interval('miou', 3)}"
        + ("" if ceiling is None else f" (first-stage ceiling {ceiling:.3f})")
        + f" (N = {quality.get('n')})"
    )


def write(entries: list[dict]) -> None:
    (HERE / "results.json").write_text(json.dumps(entries, indent=1) + "\n")
    lines = [
        "# `make train` from a fresh clone (`experiments/quickstart/time_quickstart.py`)",
        "",
        "Each row: `git clone` of the committed HEAD, then `make .venv/.installed` (venv + install), "
        "`make train-autoencoder` and `make train-ldm`, each timed on its own; both stages' checkpoints "
        f"and sample grids checked to exist. Budget: {BUDGET_S // 60} minutes in all. Then the first "
        f"`make eval CKPT={LDM_CKPT}` (budget {EVAL_BUDGET_S // 60} minutes: it trains the segmenter and "
        "converts the Inception weights before evaluating) and what it measured (bootstrap 95 % "
        "intervals in brackets).",
        "",
        "| date | commit | CPU (cores) | install | first stage | LDM | total | within budget "
        "| first eval | within budget | first eval measured | load before / after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        s = e["steps"]

        def cell(name: str, steps: dict = s) -> str:
            return f"{steps[name]['seconds'] / 60:.1f} min" if name in steps else "–"

        ok = all(s[n]["returncode"] == 0 and not s[n]["missing"] for n in TRAIN_STEPS if n in s) and all(
            n in s for n in TRAIN_STEPS
        )
        ok = ok and e["total_s"] <= BUDGET_S
        first_eval = s.get("first eval")
        eval_ok = (
            "–"
            if first_eval is None
            else ("yes" if first_eval["returncode"] == 0 and first_eval["seconds"] <= EVAL_BUDGET_S else "NO")
        )
        lines.append(
            f"| {e['date']} | `{e['commit'][:8]}` | {e['cpu']} ({e['cores']}) | {cell('install')} | "
            f"{cell('first stage')} | {cell('LDM')} | {e['total_s'] / 60:.1f} min | {'yes' if ok else 'NO'} | "
            f"{cell('first eval')} | {eval_ok} | {quality_cell(e.get('quality'))} | "
            f"{e['load_average_before'][0]} / {e['load_average_after'][0]} |"
        )
    (HERE / "results.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the clone (its outputs) of each run")
    args = parser.parse_args()
    path = HERE / "results.json"
    entries = json.loads(path.read_text()) if path.exists() else []
    for _ in range(args.runs):
        entries.append(one_run(args.keep))
        write(entries)
        print((HERE / "results.md").read_text(), flush=True)


if __name__ == "__main__":
    main()
