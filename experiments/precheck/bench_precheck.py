"""What `data.precheck` costs at training start-up: seconds per 10,000 image/mask pairs.

Writes `--pairs` small pairs (JPEG q90 images, PNG mode-L masks with 182 label ids, `--size` WxH) in
the `data=folder` layout under a temporary folder (train 90 %, val 10 %), then times
`segldm.data.precheck.precheck_data` on it, exactly as `python -m segldm.train` calls it, in each
mode (`headers`, `full` with `data.num_workers=0`: one process), `--rounds` times alternating, and
separately the part both modes share: building the splits (listing the folders, pairing, checking
that every file exists). Files were just written, so they are in the page cache: this measures
PIL and Python, not the disk (a cold disk or a network file system adds its latency per file open).

    .venv/bin/python experiments/precheck/bench_precheck.py            # writes experiments/precheck/results.md
    .venv/bin/python experiments/precheck/bench_precheck.py --config 64x48:1000 --out -   # quick look, stdout
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import logging  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import PIL  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from PIL import Image  # noqa: E402

from segldm.config.hardware import cpu_model  # noqa: E402
from segldm.data.check import open_split  # noqa: E402
from segldm.data.precheck import precheck_data  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
N_LABELS = 182


def write_pairs(root: Path, pairs: int, width: int, height: int) -> int:
    rng = np.random.default_rng(0)
    n_val = max(1, pairs // 10)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    blocks = rng.integers(0, N_LABELS, (height // 8 + 1, width // 8 + 1), dtype=np.uint8)
    mask = blocks.repeat(8, 0).repeat(8, 1)[:height, :width]
    written = 0
    for i in range(pairs):
        split = "val" if i < n_val else "train"
        folder = f"{i // 1000:03d}"  # 1,000 pairs per folder, as real datasets shard
        img_path = root / "images" / split / folder / f"{i:06d}.jpg"
        mask_path = root / "masks" / split / folder / f"{i:06d}.png"
        img_path.parent.mkdir(parents=True, exist_ok=True)
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.roll(image, i, axis=1)).save(img_path, quality=90)
        Image.fromarray(np.roll(mask, i, axis=1)).save(mask_path)
        written += img_path.stat().st_size + mask_path.stat().st_size
    return written


def data_config(root: Path, mode: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            [
                "data=folder",
                f"data.root={root}",
                f"data.n_labels={N_LABELS}",
                f"data.precheck={mode}",
                "data.precheck_labels=0",  # the per-file cost; the label sample adds a constant (docs/data.md)
                "data.num_workers=0",
            ],
        )
    return cfg.data


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(pairs: int, width: int, height: int, rounds: int) -> dict:
    """Write the pairs, then time building, headers and full; one warm-up of each first (imports, caches)."""
    with tempfile.TemporaryDirectory(prefix="segldm-precheck-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        size_bytes = write_pairs(root, pairs, width, height)
        print(
            f"{width}x{height}: wrote {pairs} pairs ({size_bytes / 2**20:.1f} MiB) in "
            f"{time.perf_counter() - start:.1f} s",
            flush=True,
        )
        configs = {mode: data_config(root, mode) for mode in ("headers", "full")}
        steps = {
            "build": lambda: [open_split(configs["headers"], s) for s in ("train", "validation")],
            "headers": lambda: precheck_data(configs["headers"]),
            "full": lambda: precheck_data(configs["full"]),
        }
        for step in steps.values():  # warm-up, not counted
            step()
        times: dict[str, list[float]] = {key: [] for key in steps}
        for r in range(rounds):
            for key, step in steps.items():
                times[key].append(timed(step))
            print(
                f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True
            )
    return {"pairs": pairs, "width": width, "height": height, "bytes": size_bytes, "times": times}


LABELS = {
    "build": "building the splits only (list folders, pair, every file exists)",
    "headers": "`data.precheck=headers` (build + both headers of every pair + sizes)",
    "full": "`data.precheck=full`, one process (build + decode every pixel + labels)",
}


def rows(result: dict) -> list[str]:
    per_10k = 10_000 / result["pairs"]
    out = []
    for key, label in LABELS.items():
        v = result["times"][key]
        med = statistics.median(v) * per_10k
        out.append(
            f"| {result['width']}x{result['height']} | {label} | **{med:.2f}** | {med / 2:.2f} | "
            f"{min(v) * per_10k:.2f} | {result['pairs']:,}: {' / '.join(f'{x:.2f}' for x in v)} |"
        )
    return out


def reading(results: list[dict]) -> list[str]:
    """What the table says, from its own numbers (medians per 10k pairs)."""

    def med(r: dict, key: str) -> float:
        return statistics.median(r["times"][key]) * 10_000 / r["pairs"]

    small, *rest = results
    spread = max(max(v) / min(v) for r in results for v in r["times"].values())
    lines = [
        f"Reading: `headers` (the default of `data=folder` and `data=sflckr`) adds "
        f"{med(small, 'headers'):.1f} s per 10k {small['width']}x{small['height']} pairs at start-up "
        f"({med(small, 'build'):.1f} s of it building the splits, which training does anyway)"
    ]
    for r in rest:
        lines[-1] += (
            f"; at {r['width']}x{r['height']} it is {med(r, 'headers'):.1f} s (it reads no pixels), while "
            f"`full` goes from {med(small, 'full'):.1f} s to {med(r, 'full'):.0f} s: it decodes every pixel"
        )
    lines[-1] += (
        ". On a real dataset give `full` `data.num_workers` processes, or run `python -m segldm.data.check` "
        "once and keep `headers` for every start. `data.precheck=off` costs nothing. Rounds of one step differ "
        f"by up to {spread:.1f}x: the cores were shared with other jobs (load average above); the best round "
        "is the machine's speed when less loaded."
    )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        action="append",
        help="WxH:PAIRS, repeatable (default: 64x48:10000 640x480:1000)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "experiments/precheck/results.md"), help="- for stdout")
    args = parser.parse_args()
    configs = args.config or ["64x48:10000", "640x480:1000"]
    logging.getLogger("segldm.data.precheck").setLevel(logging.WARNING)  # the timing lines are ours

    load_before = os.getloadavg()
    results = []
    for spec in configs:
        size, pairs = spec.split(":")
        width, height = (int(v) for v in size.lower().split("x"))
        results.append(measure(int(pairs), width, height, args.rounds))

    load = f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after"
    command = (
        "OMP_NUM_THREADS=1 .venv/bin/python experiments/precheck/bench_precheck.py"
        + "".join(f" --config {c}" for c in args.config or [])
        + (f" --rounds {args.rounds}" if args.rounds != 3 else "")
    )
    written = "; ".join(
        f"{r['pairs']:,} pairs ({2 * r['pairs']:,} files, {r['bytes'] / 2**20:.1f} MiB) at {r['width']}x{r['height']}"
        for r in results
    )
    text = "\n".join(
        [
            "# Start-up data precheck: cost per 10,000 image/mask pairs",
            "",
            "Question (issue 22): what does `data.precheck` (segldm/data/precheck.py, run by",
            "`python -m segldm.train` right after the config checks, before any model is built) add to",
            "start-up?",
            "",
            "Script: `experiments/precheck/bench_precheck.py`. It writes JPEG q90 images and PNG mode-L masks",
            f"({N_LABELS} label ids) in the `data=folder` layout (train 90 %, val 10 %, 1,000 pairs per",
            f"sub-folder) on the local disk ({written}), then times `precheck_data(cfg.data)` as training",
            f"calls it, in each mode, after one warm-up, {args.rounds} rounds alternating; seconds are scaled",
            "to 10,000 pairs. One process (`data.num_workers=0`), one thread. The files were just written,",
            "so they sit in the page cache: this measures PIL and Python per file, not the disk; on a cold",
            "disk or a network file system each file open adds its latency (headers mode opens each file",
            "once and reads only its first bytes).",
            "",
            "## Machine",
            "",
            f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs visible, shared with other jobs, so rounds",
            f"vary; {load}), {platform.system()} {platform.machine()}, Python {platform.python_version()}, Pillow",
            f"{PIL.__version__}, numpy {np.__version__}. Temporary folder: `{tempfile.gettempdir()}`.",
            "",
            f"Command: `{command}`",
            "",
            "## Results",
            "",
            "| size | what | s per 10k pairs (median) | s per 10k files | s per 10k pairs (best) | pairs timed: each round, s |",
            "|---|---|---|---|---|---|",
            *[row for r in results for row in rows(r)],
            "",
            *reading(results),
            "",
        ]
    )
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text)
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
