"""CompVis ``LatentDiffusion`` configs and checkpoints, in and out of segldm.

The only module that knows CompVis names: ``model.params`` keys and ``target`` paths are
translated into segldm's Hydra model config (``conf/model/ldm_seg.yaml`` layout), and back for
export. The state_dict needs no renaming: segldm's modules keep CompVis's keys
(``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``, ``model_ema.*``,
the schedule buffers), so loading is a strict ``load_state_dict``.

What is translated, accepted or refused is listed in the tables of :mod:`.spec`; every refusal
names the config key, its value and what segldm supports instead.

The package: :mod:`.spec` (CompVis names and what is translated, ignored or refused), :mod:`.config`
(config translation), :mod:`.checkpoint` (loading CompVis checkpoints), :mod:`.export` (segldm runs
back to CompVis). Users import the public API from here.
"""

from segldm.compat.compvis.checkpoint import (
    compvis_state_dict,
    load_compvis,
    model_from_compvis,
    read_compvis_checkpoint,
)
from segldm.compat.compvis.config import (
    Translation,
    default_ddim_steps,
    read_compvis_config,
    translate_config,
)
from segldm.compat.compvis.export import compvis_config_from_segldm
from segldm.compat.compvis.spec import COMPVIS_TARGETS, CompVisConfigError, CompVisWarning
from segldm.diffusion.compvis_ddim import DDIMSampler

__all__ = [
    "COMPVIS_TARGETS",
    "CompVisConfigError",
    "CompVisWarning",
    "DDIMSampler",
    "Translation",
    "compvis_config_from_segldm",
    "compvis_state_dict",
    "default_ddim_steps",
    "load_compvis",
    "model_from_compvis",
    "read_compvis_checkpoint",
    "read_compvis_config",
    "translate_config",
]
