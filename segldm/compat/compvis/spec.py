"""CompVis's names, as segldm knows them: which config keys and targets are translated, ignored or
refused, and the errors that say so."""

from __future__ import annotations

from typing import Any

from segldm.errors import StartupError

COMPVIS_TARGETS: dict[str, str] = {
    "ldm": "ldm.models.diffusion.ddpm.LatentDiffusion",
    "unet": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
    "first_stage": "ldm.models.autoencoder.VQModelInterface",
    "cond_stage": "ldm.modules.encoders.modules.SpatialRescaler",
    "scheduler": "ldm.lr_scheduler.LambdaLinearScheduler",
    "loss": "torch.nn.Identity",
    "data": "main.DataModuleFromConfig",
    "data_train": "ldm.data.flickr.FlickrSegTrain",
    "data_validation": "ldm.data.flickr.FlickrSegEval",
}
"""What :func:`compvis_config_from_segldm` writes (the seed config's targets)."""

ACCEPTED_CLASSES: dict[str, tuple[str, ...]] = {
    "ldm": ("LatentDiffusion",),
    "unet": ("UNetModel",),
    "first_stage": ("VQModelInterface", "VQModel"),
    "cond_stage": ("SpatialRescaler",),
    "scheduler": ("LambdaLinearScheduler",),
}
"""Accepted ``target`` class names per slot (the module path may differ between forks)."""

SEGLDM_TARGETS: dict[str, str] = {
    "ldm": "segldm.training.ldm.LatentDiffusion",
    "unet": "segldm.models.unet.UNetModel",
    "first_stage": "segldm.models.autoencoder.VQModel",
    "cond_stage": "segldm.models.cond_stage.SpatialRescaler",
    "scheduler": "segldm.training.lr_schedulers.LambdaLinearScheduler",
    "scheduler_constant": "segldm.training.lr_schedulers.ConstantScheduler",
}

# DDPM.__init__ / LatentDiffusion.__init__ defaults (latent-diffusion a506df5) of the translated keys:
# segldm's own defaults differ for some (cond_stage_trainable, cond_stage_key), so they are explicit.
LDM_DEFAULTS: dict[str, Any] = {
    "timesteps": 1000,
    "beta_schedule": "linear",
    "linear_start": 1e-4,
    "linear_end": 2e-2,
    "cosine_s": 8e-3,
    "v_posterior": 0.0,
    "loss_type": "l2",
    "parameterization": "eps",
    "l_simple_weight": 1.0,
    "original_elbo_weight": 0.0,
    "first_stage_key": "image",
    "cond_stage_key": "image",
    "image_size": 256,
    "channels": 3,
    "cond_stage_trainable": False,
    "scale_factor": 1.0,
    "scale_by_std": False,
    "use_ema": True,
}
STRUCTURE_KEYS = ("unet_config", "first_stage_config", "cond_stage_config", "scheduler_config")
CONDITIONING_KEYS = ("concat_mode", "conditioning_key")
IGNORED_LDM_KEYS: dict[str, str] = {
    "log_every_t": "logging interval of intermediates",
    "monitor": "Lightning checkpoint monitor (segldm's callbacks config decides)",
    "ignore_keys": "only used with the LDM's own ckpt_path",
    "ckpt_path": "the checkpoint given to the loader is the one loaded",
    "load_only_unet": "only used with the LDM's own ckpt_path",
    "clip_denoised": "only ancestral sampling reads it (LatentDiffusion forces it off; DDIM never clips)",
}
DEFAULT_ONLY_LDM_KEYS: dict[str, tuple[Any, ...]] = {
    "num_timesteps_cond": (None, 1),
    "cond_stage_forward": (None,),
    "given_betas": (None,),
    "learn_logvar": (False,),
    "logvar_init": (0, 0.0),
    "use_positional_encodings": (False,),
    "make_it_fit": (False,),
    "ucg_training": (None,),
    "reset_ema": (False,),
    "reset_num_ema_updates": (False,),
}
SUPPORTED_VALUES: dict[str, tuple[str, ...]] = {
    "beta_schedule": ("linear", "cosine", "sqrt_linear", "sqrt"),
    "loss_type": ("l1", "l2"),
    "parameterization": ("eps", "x0"),
}
UNET_REFUSED: dict[str, tuple[Any, str]] = {
    "use_spatial_transformer": (False, "the spatial transformer (cross-attention) UNet is not supported"),
    "context_dim": (None, "cross-attention context is not supported"),
    "num_classes": (None, "class-conditional UNets are not supported"),
    "n_embed": (None, "the UNet's codebook-prediction head is not supported"),
    "dims": (2, "only 2-D UNets are supported"),
    "use_new_attention_order": (False, "only the legacy QKV attention order is supported"),
    "use_fp16": (False, "fp16 weights are not supported; use trainer.precision for mixed precision"),
}
VQ_TRANSLATED = ("ddconfig", "n_embed", "embed_dim", "remap", "sane_index_shape")
VQ_IGNORED = (
    "lossconfig",
    "ckpt_path",
    "ignore_keys",
    "image_key",
    "colorize_nlabels",
    "monitor",
    "batch_resize_range",
    "scheduler_config",
    "lr_g_factor",
    "use_ema",
)
FIRST_STAGE_DROPPED_PREFIXES = (
    "first_stage_model.loss.",  # LPIPS/discriminator of a non-Identity lossconfig
    "first_stage_model.model_ema.",  # the autoencoder's own EMA (use_ema); the LDM decodes with raw weights
    "first_stage_model.colorize",  # VQModel's to_rgb projection (colorize_nlabels)
)
SCHEDULER_PARAMS = ("warm_up_steps", "f_min", "f_max", "f_start", "cycle_lengths", "verbosity_interval")
SEGLDM_ONLY_NOTE = (
    "segldm settings CompVis configs have no place for; CompVis ignores this section, "
    "python -m segldm.convert compvis reads it back"
)


class CompVisConfigError(StartupError):
    """A CompVis config segldm cannot represent (names the key, its value and what is supported)."""


class CompVisWarning(UserWarning):
    """A CompVis setting that is accepted but has no effect, or a segldm setting CompVis cannot hold."""
