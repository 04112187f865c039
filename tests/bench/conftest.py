"""The benchmark suite's tests: the suite (``experiments/bench/segldm_bench``) is not installed with
segldm, so its folder goes first on ``sys.path`` here, as running ``experiments/bench/run.py`` does."""

from __future__ import annotations

import sys

from tests.conftest import REPO

BENCH_DIR = REPO / "experiments" / "bench"
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))
