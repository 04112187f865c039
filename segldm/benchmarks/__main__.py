"""`python -m segldm.benchmarks [key=value ...]` (make bench): run the suite over conf/bench.yaml."""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig

import segldm  # noqa: F401  (config resolvers)
from segldm.benchmarks.suite import run_suite


@hydra.main(version_base="1.3", config_path="../../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")  # the eval section's progress bars
    results = run_suite(cfg)
    print(f"wrote {cfg.out_dir}/results.json and results.md in {results['wall_s']:.0f} s")
    goals = results.get("goals") or {}
    if goals:
        print(
            f"{goals['config']}: training step {goals['train_speedup']:.2f}x faster, "
            f"peak memory {goals['train_memory_ratio']:.2f}x of the reference way"
        )


if __name__ == "__main__":
    main()
