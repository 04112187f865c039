"""`python experiments/bench/run.py [key=value ...]` (make bench): run the suite over conf/bench.yaml.

The suite (``segldm_bench/`` beside this script) measures segldm and is no part of it, so it does not
ship in the wheel; running this file puts its folder first on ``sys.path``, which is all the import needs.
"""

from __future__ import annotations

import os
import tempfile

import hydra
from omegaconf import DictConfig

import segldm  # noqa: F401  (config resolvers)
from segldm.config.locations import hydra_config_path
from segldm_bench.suite import run_suite


@hydra.main(version_base="1.3", config_path=hydra_config_path(), config_name="bench")
def main(cfg: DictConfig) -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")  # the eval section's progress bars
    if cfg.compile_cache not in ("cold", "warm"):
        raise ValueError(f"bench.compile_cache={cfg.compile_cache!r}: use cold or warm")
    with tempfile.TemporaryDirectory(prefix="segldm-bench-inductor-") as cache:
        if cfg.compile_cache == "cold":  # inductor's on-disk caches start empty (workers inherit it)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        results = run_suite(cfg)
    print(f"wrote {cfg.out_dir}/results.json and results.md in {results['wall_s']:.0f} s")
    for goal in (results["sections"].get("reference") or {}).get("goals", []):
        met = "not measured" if goal["met"] is None else ("met" if goal["met"] else "NOT met")
        print(
            f"{goal['config']} {goal['comparison']} {goal['metric']} {goal['goal']}: {goal['value']} ({met})"
        )


if __name__ == "__main__":
    main()
