"""`python -m segldm.report <folder | MLflow experiment>`: a training sweep's runs as a table and plots
(segldm.sweeps.report; docs/sweeps.md), or an evaluation multirun's quality/alignment front
(segldm.sweeps.front; docs/evaluation.md)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from segldm.sweeps import front, report


def main(argv: Sequence[str] | None = None) -> int:
    """An eval multirun (job folders with metrics.json) gets the front; anything else the sweep report."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(front.is_eval_multirun(Path(a)) for a in args if not a.startswith("-")):
        return front.main(args)
    return report.main(args)


if __name__ == "__main__":
    sys.exit(main())
