"""`python -m segldm.eval ckpt=<checkpoint>`: score an LDM (FID, KID, mIoU) or a first stage (rFID, L1, PSNR).

The checkpoint's kind decides (segldm.evaluation.ldm.evaluate); docs/evaluation.md.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import segldm  # noqa: F401  (config resolvers)
from segldm.config.locations import hydra_config_path
from segldm.config.startup import reports_startup_errors
from segldm.evaluation.ldm import evaluate
from segldm.runtime.checks import check_config_shapes


@hydra.main(version_base="1.3", config_path=hydra_config_path(), config_name="eval")
@reports_startup_errors
def main(cfg: DictConfig) -> None:
    check_config_shapes(cfg)  # a value of the wrong kind fails here, before the checkpoint is read
    evaluate(cfg)


if __name__ == "__main__":
    main()
