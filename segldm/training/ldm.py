"""LatentDiffusion: the LightningModule that wires first stage, cond stage, UNet and diffusion math.

Attribute and method names follow CompVis's `ldm.models.diffusion.ddpm.LatentDiffusion` so that
their state_dict keys (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`,
`model_ema.*`, the schedule buffers) and their call sites (`get_learned_conditioning`,
`apply_model`, `encode_first_stage`, `decode_first_stage`, `q_sample`, `ema_scope`) carry over.
The math itself lives in `segldm.diffusion`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from segldm.condition import LabelCondition, as_condition
from segldm.config.construction import constructor_arguments
from segldm.diffusion.guidance import guidance_problem
from segldm.diffusion.objectives import (
    loss_weights,
    objective_problems,
    training_target,
    zero_terminal_snr_problems,
)
from segldm.diffusion.samplers import SamplerSettings
from segldm.diffusion.schedule import (
    SCHEDULE_BUFFER_NAMES,
    lvlb_weights,
    make_beta_schedule,
    q_sample,
    rescale_zero_terminal_snr,
    schedule_buffers,
)
from segldm.diffusion.validation import mean_and_standard_error, validation_draws
from segldm.models.ema import LitEma
from segldm.models.performance import (
    compile_module,
    compile_options,
    to_channels_last,
)
from segldm.training.guards import check_finite
from segldm.training.latent_cache import LatentCache, batch_sample_keys, has_fixed_samples
from segldm.training.lr_schedulers import (
    effective_learning_rate,
    optimizer_config,
    report_learning_rate,
)
from segldm.training.optimizers import ADAMW, build_optimizer, optimizer_factory, settings
from segldm.training.options import (
    LDM_OPTIONS,
    DiffusionOptions,
    OptimizationOptions,
    OptionLayout,
    PerformanceOptions,
    ValidationOptions,
    build_options,
    group_problems,
    move_legacy_optimizer_keys,
)
from segldm.training.sampling import Sampling, sampler_run_problems

CONDITIONING_KEYS = ("concat",)
LOSS_TYPES = ("l1", "l2")


def conditioning_key_problem(conditioning_key: str) -> str | None:
    """Why the UNet cannot be conditioned this way (only CompVis's mask concat is ported), or None."""
    if conditioning_key in CONDITIONING_KEYS:
        return None
    return (
        f"model.conditioning_key={conditioning_key!r} is not supported; expected one of {CONDITIONING_KEYS}"
    )


def diffusion_problems(diffusion: DiffusionOptions, sampler: str) -> list[str]:
    """``model.diffusion``'s problems, one sentence each naming its key: condition dropout, loss,
    objective and what a zero-terminal-SNR schedule needs of them and of ``sampler`` (the name in
    ``model.sampler``). The constructor raises them; the start-up check lists them."""
    problems = []
    if not 0.0 <= float(diffusion.cond_drop_prob) < 1.0:
        problems.append(
            f"model.diffusion.cond_drop_prob={diffusion.cond_drop_prob} must be in [0, 1): the fraction of "
            "training samples whose mask is replaced by the null condition (0: off, the seed's recipe; SDM "
            "uses 0.2)"
        )
    if diffusion.loss_type not in LOSS_TYPES:
        problems.append(
            f"model.diffusion.loss_type={diffusion.loss_type!r} is not supported; use one of {list(LOSS_TYPES)}"
        )
    problems += objective_problems(
        diffusion.parameterization, diffusion.loss_weighting, diffusion.min_snr_gamma
    )
    return problems + zero_terminal_snr_problems(
        bool(diffusion.zero_terminal_snr), diffusion.parameterization, sampler
    )


def scale_factor_problem(scale_by_std: bool, scale_factor: float) -> str | None:
    """scale_by_std sets the latent scale from the first batch, so a factor of its own contradicts it."""
    if not scale_by_std or float(scale_factor) == 1.0:
        return None
    return (
        f"model.scale_by_std=true and model.scale_factor={scale_factor}: scale_by_std sets the factor from the "
        "first batch (CompVis asserts scale_factor == 1 with it); set model.scale_factor=1.0, or "
        "model.scale_by_std=false to keep your factor"
    )


def pretrained_first_stage_problem(weights: str | None, required: bool) -> str | None:
    """The LDM trains on a frozen, pretrained first stage: ``weights`` (where its weights come from,
    the config's ``ckpt_path`` or the built module's ``loaded_from``) None is refused unless not
    ``required`` (smoke tests)."""
    if weights is not None or not required:
        return None
    return (
        "model.first_stage.ckpt_path is null: the LDM trains on a frozen, pretrained first stage. Train one "
        "with `python -m segldm.train model=autoencoder` (or `make train`, which does both stages) or use "
        "CompVis's vq-f4 checkpoint, then pass model.first_stage.ckpt_path=<file>; set "
        "model.require_pretrained_first_stage=false only for smoke tests"
    )


class DiffusionWrapper(nn.Module):
    """Holds the UNet as `diffusion_model` (the CompVis key prefix) and applies the conditioning."""

    def __init__(self, diffusion_model: nn.Module, conditioning_key: str = "concat") -> None:
        super().__init__()
        problem = conditioning_key_problem(conditioning_key)
        if problem:
            raise ValueError(problem)
        self.diffusion_model = diffusion_model
        self.conditioning_key = conditioning_key

    def forward(self, x: torch.Tensor, t: torch.Tensor, c_concat: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.diffusion_model(torch.cat([x, *c_concat], dim=1), t)


def disabled_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """Replacement for `.train()` that keeps a frozen module in eval mode for good."""
    return self


class LatentDiffusion(Sampling, L.LightningModule):
    """Mask-conditioned LDM: frozen VQ first stage, trainable SpatialRescaler, UNet on cat[z_t, c]."""

    checkpoint_kind: ClassVar[str] = "ldm"  # segldm.kind of its checkpoints; resuming checks it
    option_layout: ClassVar[OptionLayout] = LDM_OPTIONS  # its groups and older flat keys

    def __init__(
        self,
        unet: nn.Module,
        first_stage: nn.Module,
        cond_stage: nn.Module,
        *,
        diffusion: Mapping[str, Any] | DiffusionOptions | None = None,
        optimization: Mapping[str, Any] | OptimizationOptions | None = None,
        performance: Mapping[str, Any] | PerformanceOptions | None = None,
        validation: Mapping[str, Any] | ValidationOptions | None = None,
        sampler: Mapping[str, Any] | SamplerSettings | None = None,
        scheduler: Callable[[int], float] | None = None,
        first_stage_key: str = "image",
        cond_stage_key: str = "segmentation",
        image_size: int = 64,
        channels: int = 3,
        conditioning_key: str = "concat",
        cond_stage_trainable: bool = True,
        scale_factor: float = 1.0,
        scale_by_std: bool = False,
        use_ema: bool = True,
        ema_decay: float = 0.9999,
        require_pretrained_first_stage: bool = True,
        ignore_label: int | None = None,
        condition: LabelCondition | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        diffusion = build_options(DiffusionOptions, diffusion, "diffusion")
        if isinstance(optimization, Mapping):  # checkpoints from before the optimiser was config
            optimization = move_legacy_optimizer_keys(optimization, self.option_layout.legacy_optimizer_keys)
        optimization = build_options(OptimizationOptions, optimization, "optimization")
        performance = build_options(PerformanceOptions, performance, "performance")
        validation = build_options(ValidationOptions, validation, "validation")
        sampler = SamplerSettings.from_config(sampler, "model.sampler")  # an unknown key is refused here
        problems = diffusion_problems(diffusion, sampler.name) + [
            problem
            for problem in (
                scale_factor_problem(scale_by_std, scale_factor),
                pretrained_first_stage_problem(
                    getattr(first_stage, "loaded_from", None), require_pretrained_first_stage
                ),
            )
            if problem
        ]
        if problems:
            raise ValueError("; ".join(problems))
        self.num_timesteps = int(diffusion.timesteps)
        self.diffusion_settings = dict(vars(diffusion))  # model.diffusion: diffusers: samplers rebuild it
        self.loss_type = diffusion.loss_type
        self.parameterization = diffusion.parameterization
        self.loss_weighting = diffusion.loss_weighting
        self.min_snr_gamma = float(diffusion.min_snr_gamma)
        self.l_simple_weight = diffusion.l_simple_weight
        self.original_elbo_weight = diffusion.original_elbo_weight
        self.first_stage_key = first_stage_key
        self.cond_stage_key = cond_stage_key
        # what a mask means (segldm/condition.py); checkpoints older than `model.condition` name only
        # the ignore label, and their cond stage's input channels are the labels
        self.condition = as_condition(
            condition, LabelCondition(int(getattr(cond_stage, "in_channels", 1)), ignore_label)
        )
        self.image_size = image_size
        self.channels = channels
        self.cond_stage_trainable = cond_stage_trainable
        self.base_learning_rate = optimization.base_learning_rate
        self.learning_rate = optimization.base_learning_rate
        self.scale_lr = optimization.scale_lr
        # model.optimization.optimizer: factory(params, lr=...) (segldm/training/optimizers.py)
        self.optimizer_factory = optimizer_factory(
            optimization.optimizer, ADAMW, "model.optimization.optimizer"
        )
        self.lr_lambda = scheduler
        self.sampler_settings = sampler  # model.sampler: what sampling uses where its caller names nothing
        # condition dropout for classifier-free guidance: the null condition is an all-zero conditioning
        # map (what the cond stage gives for nothing; no weights of its own, so CompVis keys are unchanged)
        self.cond_drop_prob = float(diffusion.cond_drop_prob)
        # validation: the same timestep and noise per sample at every validation (false: CompVis's draws)
        self.deterministic_validation = bool(validation.deterministic)
        self.validation_seed = int(validation.seed)
        self._validation_losses: dict[str, list[torch.Tensor]] = {}
        self.segldm_config: dict[str, Any] | None = None  # resolved run config, saved in checkpoints

        self.model = DiffusionWrapper(unet, conditioning_key)
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self.model, decay=ema_decay)

        betas = make_beta_schedule(
            diffusion.beta_schedule,
            self.num_timesteps,
            diffusion.linear_start,
            diffusion.linear_end,
            diffusion.cosine_s,
        )
        if diffusion.zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        buffers = schedule_buffers(betas, diffusion.v_posterior)
        for name in SCHEDULE_BUFFER_NAMES:
            self.register_buffer(name, buffers[name])
        self.register_buffer("lvlb_weights", lvlb_weights(buffers, self.parameterization), persistent=False)
        self.register_buffer("logvar", torch.zeros(self.num_timesteps), persistent=False)

        self.scale_by_std = scale_by_std
        if scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
        else:
            self.scale_factor = float(scale_factor)

        self.first_stage_model = first_stage.eval()
        self.first_stage_model.train = disabled_train.__get__(self.first_stage_model)
        for param in self.first_stage_model.parameters():
            param.requires_grad = False
        self.cond_stage_model = cond_stage
        if not cond_stage_trainable:
            self.cond_stage_model.eval()
            self.cond_stage_model.train = disabled_train.__get__(self.cond_stage_model)
            for param in self.cond_stage_model.parameters():
                param.requires_grad = False
        self.colorize: torch.Tensor | None = None
        self._restarted_from_ckpt = False
        # speed/memory paths (segldm/models/performance.py; docs/performance.md)
        self.first_stage_inference_mode = performance.first_stage_inference_mode
        self.fused_label_conditioning = performance.fused_label_conditioning
        self.channels_last = performance.channels_last
        self.compile_options = compile_options(performance.compile)
        self.first_stage_compile_options = compile_options(performance.compile_first_stage)
        self.latent_cache: LatentCache | None = LatentCache() if performance.cache_latents else None

    # ------------------------------------------------------------------ start-up checks
    @classmethod
    def startup_problems(cls, config: Mapping[str, Any], key: str) -> list[str]:
        """What the constructor would refuse that this config (``model``) already shows, each problem
        from the function the constructor raises it with, plus the sampler it samples with by default
        (``model.sampler``: its name, step count and guidance scale)."""
        arguments = constructor_arguments(cls, config)
        problems = group_problems(config, cls.option_layout)
        problems += [
            problem
            for problem in (
                conditioning_key_problem(arguments["conditioning_key"]),
                scale_factor_problem(bool(arguments["scale_by_std"]), float(arguments["scale_factor"])),
                pretrained_first_stage_problem(
                    dict(config.get("first_stage") or {}).get("ckpt_path"),
                    bool(arguments["require_pretrained_first_stage"]),
                ),
            )
            if problem
        ]
        try:
            settings = SamplerSettings.from_config(config.get("sampler"), f"{key}.sampler")
        except ValueError as err:  # an unknown key or value of model.sampler
            problems.append(str(err))
            settings = None
        try:
            diffusion = build_options(DiffusionOptions, config.get("diffusion"), "diffusion")
        except ValueError:  # an unknown key: group_problems names it
            return problems
        sampler_name = settings.name if settings else dict(config.get("sampler") or {}).get("name")
        problems += diffusion_problems(diffusion, str(sampler_name or SamplerSettings().name))
        if settings is None:
            return problems
        return problems + cls.sampling_problems(
            config,
            key,
            {f"{key}.sampler.steps": (f"{key}.sampler.name", settings.name, settings.steps)},
            {f"{key}.sampler.guidance_scale": settings.guidance_scale},
        )

    @classmethod
    def sampling_problems(
        cls,
        config: Mapping[str, Any],
        key: str,
        runs: Mapping[str, tuple[str, str | None, int]],
        guidance_scales: Mapping[str, float | None],
    ) -> list[str]:
        """Sampling asked of a model with this config (its own defaults, sample grids, in-training
        metrics): ``runs``, steps key -> (name key, sampler name or None: ``model.sampler``'s, steps),
        each checked by its sampler against this schedule; ``guidance_scales``, key -> scale or None
        (``model.sampler``'s), each >= 1 and > 1 only with condition dropout."""
        try:
            settings = SamplerSettings.from_config(config.get("sampler"), f"{key}.sampler")
            diffusion = build_options(DiffusionOptions, config.get("diffusion"), "diffusion")
        except ValueError:
            return []  # startup_problems names the key
        named = {
            steps_key: (name_key, settings.name if name is None else name, steps)
            for steps_key, (name_key, name, steps) in runs.items()
        }
        problems = sampler_run_problems(settings, diffusion.timesteps, vars(diffusion), named)
        for scale_key, scale in guidance_scales.items():
            scale = settings.guidance_scale if scale is None else scale
            problem = guidance_problem(float(scale), scale_key, float(diffusion.cond_drop_prob))
            if problem:
                problems.append(problem)
        return problems

    # ------------------------------------------------------------------ CompVis-named interface
    @contextmanager
    def ema_scope(self, context: str | None = None) -> Iterator[None]:
        """Temporarily swap the UNet weights for their EMA shadows (no-op without EMA)."""
        if self.use_ema:
            self.model_ema.store(self.model.parameters())
            self.model_ema.copy_to(self.model)
        try:
            yield
        finally:
            if self.use_ema:
                self.model_ema.restore(self.model.parameters())

    def get_input(self, batch: dict[str, Any], key: str) -> torch.Tensor:
        """batch[key] (B, H, W, C) -> (B, C, H, W) float, as DDPM.get_input.

        The cond key of a batch that ships integer label ids (what the data loaders do by default:
        ~180x less to move than a one-hot) gets the condition's dense map, built here on the
        batch's device.
        """
        if key == self.cond_stage_key and key not in batch:
            return self.condition.model_input(batch, fused=False)
        x = batch[key]
        if x.ndim == 3:
            x = x[..., None]
        return rearrange(x, "b h w c -> b c h w").contiguous().float()

    def get_learned_conditioning(self, c: torch.Tensor) -> torch.Tensor:
        """A condition input (the dense float map, or an integer label map: the fused path that builds
        no one-hot) -> conditioning maps at latent resolution (segldm.condition.LabelCondition.encode)."""
        return self.condition.encode(self.cond_stage_model, c)

    def encode_first_stage(self, x: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] -> pre-quantisation latent h (VQModelInterface.encode).

        The frozen first stage runs under inference_mode (no autograd bookkeeping at all;
        `first_stage_inference_mode: false`: no_grad, as the reference); the result is a normal,
        contiguous tensor (so `randn_like` draws the reference's noise also with channels_last) and
        always float32: under autocast the encoder's convolutions run in bf16/fp16, but the latent,
        the noise drawn like it and the forward process stay in full precision.
        """
        if not self.first_stage_inference_mode:
            with torch.no_grad():
                return self.first_stage_model.encode(x).to(
                    torch.float32, memory_format=torch.contiguous_format
                )
        with torch.inference_mode():
            h = self.first_stage_model.encode(x)
        return h.to(torch.float32).clone(memory_format=torch.contiguous_format)

    def get_first_stage_encoding(self, h: torch.Tensor) -> torch.Tensor:
        return self.scale_factor * h

    @torch.no_grad()
    def decode_first_stage(
        self, z: torch.Tensor, predict_cids: bool = False, force_not_quantize: bool = False
    ) -> torch.Tensor:
        """Diffusion latent -> image: unscale, quantise (unless told not to), decode (float32 out)."""
        return self.first_stage_model.decode(
            z.float() / self.scale_factor, force_not_quantize=predict_cids or force_not_quantize
        ).float()

    def apply_model(
        self, x_noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | Sequence[torch.Tensor]
    ):
        c_concat = list(cond) if isinstance(cond, (list, tuple)) else [cond]
        return self.model(x_noisy, t, c_concat=c_concat)

    def q_sample(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        noise = torch.randn_like(x_start) if noise is None else noise
        return q_sample(x_start, t, noise, self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod)

    def get_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Elementwise loss (no reduction)."""
        if self.loss_type == "l1":
            return (target - pred).abs()
        return F.mse_loss(target, pred, reduction="none")

    def p_losses(
        self, x_start: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss at timesteps t, with CompVis's logged terms.

        Mixed precision touches the UNet only: the latent, the noise, q_sample, the target, the loss
        and its weighting are float32 whatever autocast is active (as diffusers and k-diffusion).
        """
        x_start = x_start.float()
        noise = torch.randn_like(x_start) if noise is None else noise.float()
        with torch.autocast(x_start.device.type, enabled=False):
            x_noisy = self.q_sample(x_start, t, noise)
        model_output = self.apply_model(x_noisy, t, cond).float()
        prefix = "train" if self.training else "val"
        with torch.autocast(x_start.device.type, enabled=False):
            a_t = self.alphas_cumprod[t]
            target = training_target(self.parameterization, x_start, noise, a_t)
            weights = loss_weights(self.loss_weighting, self.parameterization, a_t, self.min_snr_gamma)
            loss_simple = self.get_loss(model_output, target).mean(dim=[1, 2, 3]) * weights
            logvar_t = self.logvar.to(t.device)[t]
            per_sample = self.l_simple_weight * (loss_simple / torch.exp(logvar_t) + logvar_t)
            per_sample = per_sample + self.original_elbo_weight * self.lvlb_weights[t] * loss_simple
            loss = self.l_simple_weight * (loss_simple / torch.exp(logvar_t) + logvar_t).mean()
            loss_vlb = (self.lvlb_weights[t] * loss_simple).mean()
            loss = loss + self.original_elbo_weight * loss_vlb
        logs = {
            f"{prefix}/loss_simple": loss_simple.mean(),
            f"{prefix}/loss_vlb": loss_vlb,
            f"{prefix}/loss": loss,
        }
        if not self.training:  # per-sample losses for the validation loss's standard error
            logs[f"{prefix}/loss_per_sample"] = per_sample.detach()
        return loss, logs

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Draw t first, then encode c, then (condition dropout) which masks to drop, then the noise
        (the reference's RNG order)."""
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=self.device).long()
        if self.cond_stage_trainable:
            c = self.get_learned_conditioning(c)
        if self.training and self.cond_drop_prob > 0:  # drawn only when on: p = 0 keeps the reference's draws
            keep = torch.rand(x.shape[0], device=self.device) >= self.cond_drop_prob
            c = c * keep.view(-1, *[1] * (c.ndim - 1)).to(c.dtype)  # dropped rows: the null condition
        return self.p_losses(x, c, t)

    def get_batch_latents(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, c): scaled latent of the image and the (raw or encoded) condition.

        The raw condition is the batch's label map itself when it has no one-hot
        (`fused_label_conditioning`); training batches read their latents from the latent cache
        when `cache_latents` is on.
        """
        x = self.get_input(batch, self.first_stage_key)
        keys = batch_sample_keys(batch) if self.latent_cache is not None and self.training else None
        if self.latent_cache is not None and self.training and keys is None:
            raise ValueError(
                "model.performance.cache_latents=true needs batches that name their samples ('index' or "
                "'relative_file_path_'); this dataset yields neither: set model.performance.cache_latents=false"
            )
        if keys is not None:
            h = self.latent_cache.lookup(keys, x, self.encode_first_stage)
        else:
            h = self.encode_first_stage(x)
        z = self.get_first_stage_encoding(h).detach()
        if self.cond_stage_key in batch:  # the reference loaders' one-hot
            c = self.get_input(batch, self.cond_stage_key)
        else:
            c = self.condition.model_input(batch, fused=self.fused_label_conditioning)
        if not self.cond_stage_trainable:
            with torch.no_grad():
                c = self.get_learned_conditioning(c)
        return z, c

    def shared_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z, c = self.get_batch_latents(batch)
        return self(z, c)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        """Memory format and torch.compile (model.performance.channels_last, .compile, .compile_first_stage)."""
        self.apply_performance_settings()

    def apply_performance_settings(self) -> None:
        """channels_last for the UNet and first stage; torch.compile of the UNet and of the first
        stage's encoder, in place (keys unchanged)."""
        if self.channels_last:
            to_channels_last(self.model)
            to_channels_last(self.first_stage_model)
        if self.compile_options is not None and not getattr(self, "_compiled", False):
            compile_module(self.model.diffusion_model, self.compile_options)
            self._compiled = True
        encoder = getattr(self.first_stage_model, "encoder", None)
        if self.first_stage_compile_options is not None and not getattr(self, "_compiled_first_stage", False):
            if encoder is None:
                raise ValueError(
                    f"model.performance.compile_first_stage: {type(self.first_stage_model).__name__} has no "
                    "`encoder` module to compile; set it to false"
                )
            compile_module(encoder, self.first_stage_compile_options)
            self._compiled_first_stage = True

    def on_fit_start(self) -> None:
        """model.performance.cache_latents only for data whose samples never change (no random crops or flips)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        dataset = getattr(datamodule, "train_dataset", None)
        if self.latent_cache is not None and dataset is not None and not has_fixed_samples(dataset):
            raise ValueError(
                f"model.performance.cache_latents=true, but the training data ({type(dataset).__name__}) changes its "
                "samples between epochs (random crops or flips): cached latents would be wrong. Set "
                "model.performance.cache_latents=false, or turn the augmentations off: data.train.random_crop=false "
                "data.train.flip=false"
            )

    def on_train_batch_start(self, batch: dict[str, Any] | None, batch_idx: int) -> None:
        if (
            batch is not None
            and self.scale_by_std
            and self.global_step == 0
            and batch_idx == 0
            and not self._restarted_from_ckpt
        ):
            x = self.get_input(batch, self.first_stage_key).to(self.device)
            z = self.encode_first_stage(x).detach()
            trainer = self._trainer
            if trainer is not None and trainer.world_size > 1:
                # every rank must use one factor: the std of the whole first global batch (DDP
                # runs with broadcast_buffers=False, so nothing else would make them agree)
                self.scale_factor.fill_(1.0 / global_std(z, trainer.strategy))
            else:
                self.scale_factor.fill_(1.0 / z.flatten().std())
            self.print(f"scale_by_std: scale_factor set to {self.scale_factor.item():.6f}")

    def training_step(self, batch: dict[str, Any] | None, batch_idx: int) -> torch.Tensor | None:
        if batch is None:  # every sample was skipped (data.on_error=skip): Lightning skips the step
            return None
        loss, logs = self.shared_step(batch)
        check_finite(loss, self.global_step, batch_idx)
        self.log("train/loss", logs.pop("train/loss"), prog_bar=True, on_step=True, on_epoch=False)
        self.log_dict(logs, on_step=True, on_epoch=False)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Step, then update the EMA, so a checkpoint written at this step holds both.

        (CompVis updates in on_train_batch_end, which runs after the checkpoint callbacks here;
        with gradient accumulation it would also update once per micro-batch.)
        """
        super().optimizer_step(*args, **kwargs)
        if self.use_ema:
            self.model_ema(self.model)

    def validation_step(self, batch: dict[str, Any] | None, batch_idx: int) -> None:
        if batch is None:  # every sample of this batch was skipped (data.on_error=skip)
            return
        batch_size = batch[self.first_stage_key].shape[0]
        _, logs = self.validation_losses(batch, batch_idx)
        with self.ema_scope():
            _, logs_ema = self.validation_losses(batch, batch_idx)
        self._validation_losses.setdefault("val/loss", []).append(logs.pop("val/loss_per_sample"))
        self._validation_losses.setdefault("val/loss_ema", []).append(logs_ema.pop("val/loss_per_sample"))
        logs_ema = {f"{k}_ema": v for k, v in logs_ema.items()}
        self.log_dict(
            {**logs, **logs_ema}, on_step=False, on_epoch=True, batch_size=batch_size, sync_dist=True
        )  # sync_dist: with DDP, the mean over every rank's validation shard, not rank 0's alone

    def validation_losses(self, batch: dict[str, Any], batch_idx: int) -> tuple[torch.Tensor, dict]:
        """The validation loss of a batch: with deterministic_validation, each sample's timestep and
        noise come from its own key (segldm.diffusion.validation), else CompVis's random draws."""
        if not self.deterministic_validation:
            return self.shared_step(batch)
        z, c = self.get_batch_latents(batch)
        if self.cond_stage_trainable:
            c = self.get_learned_conditioning(c)
        keys = batch_sample_keys(batch) or [batch_idx * z.shape[0] + i for i in range(z.shape[0])]
        t, noise = validation_draws(keys, z.shape[1:], self.num_timesteps, self.validation_seed, z.device)
        return self.p_losses(z, c, t, noise)

    def on_validation_epoch_end(self) -> None:
        """val/loss_se (and _ema): the standard error of the validation loss over every sample seen."""
        for name, chunks in self._validation_losses.items():
            values = torch.cat(chunks)
            if self.trainer.world_size > 1:
                values = self.all_gather(values).flatten()
            _, standard_error = mean_and_standard_error(values)
            suffix = "_ema" if name.endswith("_ema") else ""
            self.log(
                f"val/loss_se{suffix}", standard_error, on_step=False, on_epoch=True, rank_zero_only=True
            )
        self._validation_losses = {}

    def configure_optimizers(self):
        self.learning_rate = effective_learning_rate(self.base_learning_rate, self._trainer, self.scale_lr)
        report_learning_rate(self, self.learning_rate)
        params = list(self.model.parameters())
        if self.cond_stage_trainable:
            params += list(self.cond_stage_model.parameters())
        return optimizer_config(self.make_optimizer(params, self.learning_rate), self.lr_lambda)

    def make_optimizer(self, params: Iterable[Any], lr: float) -> torch.optim.Optimizer:
        """The configured optimiser over ``params`` (``fused: null`` resolved for their device)."""
        return build_optimizer(self.optimizer_factory, params, lr)

    @property
    def optimizer_settings(self) -> dict[str, Any]:
        """What the optimiser config fixes besides the learning rate (betas, weight_decay, fused)."""
        return settings(self.optimizer_factory)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["segldm"] = {"kind": self.checkpoint_kind, "config": self.segldm_config}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._restarted_from_ckpt = True


def global_std(z: torch.Tensor, strategy: Any) -> torch.Tensor:
    """Unbiased std of z over all ranks' tensors together (two passes, as torch.std over their concatenation)."""
    z = z.flatten().double()
    stats = strategy.reduce(torch.stack([z.sum(), z.new_tensor(z.numel())]), reduce_op="sum")
    mean = stats[0] / stats[1]
    squares = strategy.reduce(((z - mean) ** 2).sum(), reduce_op="sum")
    return torch.sqrt(squares / (stats[1] - 1)).float()
