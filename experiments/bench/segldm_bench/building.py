"""Models of the benchmark configurations: the training config (conf/train.yaml + overrides) with
random weights, no first-stage checkpoint or data needed."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from segldm.config.locations import config_dir
from segldm.training.ldm import LatentDiffusion
from segldm_bench.modes import randomize_zero_parameters

CONF_DIR = config_dir()


@contextmanager
def hydra_context() -> Iterator[None]:
    """compose() needs an initialised Hydra: the running app's, or a temporary one over conf/."""
    if GlobalHydra.instance().is_initialized():
        yield
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            yield


def compose_train(overrides: list[str]) -> DictConfig:
    """The training config of a benchmark configuration (no first-stage checkpoint needed)."""
    with hydra_context():
        return compose(
            config_name="train",
            overrides=[
                *overrides,
                "model.require_pretrained_first_stage=false",
                "model.first_stage.ckpt_path=null",
                "logger=none",
            ],
        )


def build_model(overrides: list[str], device: torch.device, seed: int) -> tuple[LatentDiffusion, DictConfig]:
    """The LDM of a configuration with random weights (no zero layers), on `device`."""
    cfg = compose_train(overrides)
    torch.manual_seed(seed)
    model = instantiate(cfg.model, scheduler=None)
    randomize_zero_parameters(model, seed=seed)
    return model.to(device), cfg
