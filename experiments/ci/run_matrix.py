"""Run the test tiers under the CPU settings the suite must pass on; record where and how long.

Each setting is the README's test command (`pytest -q`, `-m slow` for the slow tier) with CI=true
(so a skipped test or a missing fixture fails), run under `taskset` and/or `ATEN_CPU_CAPABILITY`.
Results merge into experiments/ci/results.json (one entry per tier x setting x CPU model) and
results.md is rewritten from it, so runs on other machines add rows instead of replacing them.

    .venv/bin/python experiments/ci/run_matrix.py --tier fast --setting two-cores one-core avx2
    .venv/bin/python experiments/ci/run_matrix.py --tier slow --setting two-cores
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from segldm.config.hardware import cpu_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SETTINGS: dict[str, tuple[list[str], dict[str, str]]] = {
    "two-cores": (["taskset", "-c", "0,1"], {}),
    "one-core": (["taskset", "-c", "0"], {}),
    "avx2": (["taskset", "-c", "0,1"], {"ATEN_CPU_CAPABILITY": "avx2"}),
}
TIERS = {"fast": [], "slow": ["-m", "slow"]}


def cpu_flags() -> list[str]:
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set(
        next((line for line in text.splitlines() if line.startswith("flags")), ": ").split(":", 1)[1].split()
    )
    return [f for f in wanted if f in flags]


def run(tier: str, setting: str) -> dict:
    prefix, extra_env = SETTINGS[setting]
    command = [*prefix, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TIERS[tier]]
    env = {**os.environ, "CI": "true", **extra_env}
    print(f"== {tier} tier, {setting}: {' '.join(command)}", flush=True)
    started = time.monotonic()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    failures = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", tail)}
    print(tail, f"({wall:.0f} s wall)", *failures, sep="\n", flush=True)
    return {
        "tier": tier,
        "setting": setting,
        "command": shlex.join(
            [f"{k}={v}" for k, v in {"CI": "true", **extra_env}.items()]
            + [("python" if part == sys.executable else part) for part in command]
        ),
        "returncode": proc.returncode,
        "summary": tail,
        "counts": counts,
        "failures": failures,
        "wall_s": round(wall, 1),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores_available": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "torch": _torch_version(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def _torch_version() -> str:
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True
    )
    return out.stdout.strip()


def write(entries: list[dict]) -> None:
    (HERE / "results.json").write_text(json.dumps(entries, indent=1) + "\n")
    lines = [
        "# The test suite across CPUs and CPU settings (`experiments/ci/run_matrix.py`)",
        "",
        "Each row: one tier of the README's test command with `CI=true` (skips and missing fixtures fail), "
        "under the setting named (`taskset` cores, `ATEN_CPU_CAPABILITY`). Wall times are for the machine "
        "named, with whatever else ran on it (load after the run in results.json).",
        "",
        "| tier | setting | CPU | flags | result | wall | date |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        result = "passed" if e["returncode"] == 0 else "FAILED"
        lines.append(
            f"| {e['tier']} | {e['setting']} | {e['cpu']} | {' '.join(e['cpu_flags'])} | {result}: {e['summary']} "
            f"| {e['wall_s'] / 60:.1f} min | {e['date']} |"
        )
    (HERE / "results.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tier", choices=sorted(TIERS), nargs="+", default=["fast"])
    parser.add_argument("--setting", choices=sorted(SETTINGS), nargs="+", default=["two-cores"])
    args = parser.parse_args()
    path = HERE / "results.json"
    entries = json.loads(path.read_text()) if path.exists() else []
    status = 0
    for tier in args.tier:
        for setting in args.setting:
            entry = run(tier, setting)
            entries = [
                e for e in entries if (e["tier"], e["setting"], e["cpu"]) != (tier, setting, entry["cpu"])
            ] + [entry]
            write(entries)
            status |= entry["returncode"]
    sys.exit(status)


if __name__ == "__main__":
    main()
