"""Table of eval runs for experiments/eval/results.md: one row per outputs/eval/<dir>/metrics.json.

.venv/bin/python experiments/eval/summarize.py outputs/eval/quickstart_step0000500 ... > table.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(folder: Path) -> str:
    m = json.loads((folder / "metrics.json").read_text())
    s = m["sampler"]
    return (
        f"| `{Path(m['checkpoint']).name}` | {m['global_step']} | {m['num_samples']} | {s['name']} {s['steps']}, eta {s['eta']} "
        f"| {m['miou']:.4f} | {m['miou_real']:.4f} | {m['pixel_accuracy']:.4f} | {m['fid']:.2f} "
        f"| {1000 * m['kid_mean']:.1f} | {m['timings_s']['total']:.0f} |"
    )


def main() -> None:
    print(
        "| checkpoint | step | masks | sampler | mIoU generated | mIoU real | pixel acc. generated | FID "
        "| KID x1000 | time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arg in sys.argv[1:]:
        print(row(Path(arg)))


if __name__ == "__main__":
    main()
