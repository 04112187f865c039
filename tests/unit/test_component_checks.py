"""Each component checks its own config at start-up, asked by its class (not by `_target_` strings).

One case per rule that moved out of `segldm.runtime.checks` into its component: the composed config
fails `validate_config` naming the key, on a dataset whose files do not exist (reading any of them
would fail differently), and the train entry stops with the same error before it reads data. The
cross-component rules ask the components for their numbers, so a backbone of another shape plugs in.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from segldm.pipeline.masks import size_multiple
from segldm.runtime.checks import Component, ConfigError, configured_components, validate_config
from segldm.runtime.resume import model_kind
from segldm.train import train
from tests.conftest import compose_train

LDM_CASES = [
    # (overrides, fragment of the message): rule -> where it lives now
    (["data.batch_size=0"], "data.batch_size=0 must be positive"),  # SegmentationDataModule
    (["+data.val_batch_size=0"], "data.val_batch_size=0 must be positive"),  # SegmentationDataModule
    (["model.diffusion.cond_drop_prob=1.0"], "model.diffusion.cond_drop_prob=1.0 must be in [0, 1)"),
    (["model.diffusion.loss_type=l3"], "model.diffusion.loss_type='l3' is not supported"),
    (["model.diffusion.parameterization=score"], "model.diffusion.parameterization='score' is not supported"),
    (["model.diffusion.zero_terminal_snr=true"], "zero_terminal_snr=true with parameterization=eps"),
    (
        ["model.scale_by_std=true", "model.scale_factor=0.5"],
        "model.scale_by_std=true and model.scale_factor=0.5",
    ),
    (["model.first_stage.ckpt_path=null"], "model.first_stage.ckpt_path is null"),  # LatentDiffusion
    (["model.conditioning_key=crossattn"], "model.conditioning_key='crossattn' is not supported"),
    (["model.optimization.base_learning_rate=0"], "model.optimization.base_learning_rate=0 must be positive"),
    (["+model.diffusion.timestep=10"], "model.diffusion has unknown key(s) ['timestep']"),
    (["model.sampler.steps=0"], "model.sampler.steps=0 must be positive"),
    (["model.sampler.name=plms"], "model.sampler.name='plms' is not a sampler"),
    (["model.sampler.guidance_scale=0.5"], "model.sampler.guidance_scale=0.5: classifier-free guidance"),
    (["model.sampler.guidance_scale=2"], "guides a model trained without condition dropout"),
    (["model.unet.attention_resolutions=[3]"], "[3] can never match a UNet level"),  # UNetModel
    (["model.unet.model_channels=40"], "model.unet: UNetModel: every channel count"),  # its constructor
    (["model.unet.num_heads=3"], "model.unet: attention channels 1024 are not divisible by num_heads 3"),
    (
        ["model.first_stage.ckpt_path=/nowhere/vq.ckpt"],
        "model.first_stage.ckpt_path=/nowhere/vq.ckpt does not",
    ),
    (  # VQModel's constructor (GroupNorm), on the meta device
        ["model.first_stage.ddconfig.ch=24"],
        "model.first_stage: autoencoder: every channel count must be a positive multiple of 32",
    ),
    (["model.cond_stage.method=cubic"], "model.cond_stage: SpatialRescaler: method must be one of"),
    (  # the scheduler's constructor: a one-per-cycle list left in another scheduler's node
        ["scheduler=cosine", "scheduler.f_start=[0.01]"],
        "scheduler (CosineScheduler): scheduler.f_start=[0.01] must be one number",
    ),
    (
        ["scheduler=cosine", "trainer.max_steps=-1"],
        "scheduler.max_steps > 0, got warm_up_steps=1000, max_steps=-1",
    ),
    (["scheduler=constant", "scheduler.warm_up_steps=-5"], "scheduler.warm_up_steps must be >= 0, got -5"),
    (
        ["model.unet._target_=segldm.models.unet.NoSuchUNet"],
        "model.unet._target_=segldm.models.unet.NoSuchUNet",
    ),
]

AUTOENCODER_CASES = [
    (["model.loss.disc_loss=wgan"], "model.loss.disc_loss='wgan'; use one of ['hinge', 'vanilla']"),
    (["model.loss.disc_num_layers=0"], "model.loss.disc_num_layers=0 must be >= 1"),
    (["model.loss.perceptual_weight=1", "model.loss.vgg16_path=/nowhere.pth"], "vgg16_path=/nowhere.pth"),
    (["data.size=16"], "model.loss.disc_num_layers=3: the PatchGAN needs images of at least 24 px"),
    (["~model.loss._target_"], "model.loss has settings"),  # VQAutoencoderModule
    (["model.optimization.base_learning_rate=-1"], "model.optimization.base_learning_rate=-1"),
]


def _ldm(tmp_path, *overrides: str):
    ckpt = tmp_path / "fs.ckpt"
    ckpt.write_bytes(b"x")
    return compose_train(
        [
            "data=sflckr",
            f"paths.data_dir={tmp_path}/no_data",  # nothing to read: a data error would be another one
            f"paths.output_root={tmp_path}/out",
            f"paths.output_dir={tmp_path}/out/run",
            f"model.first_stage.ckpt_path={ckpt}",
            *overrides,
        ]
    )


def _autoencoder(tmp_path, *overrides: str):
    return compose_train(
        [
            "model=autoencoder",
            "model/loss=taming",
            "model.loss.perceptual_weight=0",
            "data.size=32",
            f"paths.data_dir={tmp_path}/no_data",
            f"paths.output_root={tmp_path}/out",
            f"paths.output_dir={tmp_path}/out/run",
            *overrides,
        ]
    )


def test_the_base_configs_pass(tmp_path):
    validate_config(_ldm(tmp_path))
    validate_config(_autoencoder(tmp_path))


@pytest.mark.parametrize(("overrides", "fragment"), LDM_CASES, ids=lambda value: str(value)[:60])
def test_each_ldm_component_rule_fires_at_start_up(overrides, fragment, tmp_path):
    with pytest.raises(ConfigError) as err:
        validate_config(_ldm(tmp_path, *overrides))
    assert fragment in str(err.value)


@pytest.mark.parametrize(("overrides", "fragment"), AUTOENCODER_CASES, ids=lambda value: str(value)[:60])
def test_each_autoencoder_component_rule_fires_at_start_up(overrides, fragment, tmp_path):
    with pytest.raises(ConfigError) as err:
        validate_config(_autoencoder(tmp_path, *overrides))
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("compose", "overrides", "fragment"),
    [(_ldm, *case) for case in LDM_CASES] + [(_autoencoder, *case) for case in AUTOENCODER_CASES],
    ids=lambda value: str(value)[:60] if not callable(value) else value.__name__,
)
def test_the_train_entry_stops_before_reading_data(compose, overrides, fragment, tmp_path):
    """No data files: a data precheck or a loader would fail with its own error first."""
    with pytest.raises(ConfigError) as err:
        train(compose(tmp_path, *overrides))
    assert fragment in str(err.value)
    assert not (tmp_path / "out" / "run").exists()


def test_a_rule_the_constructor_shares_is_written_once(tmp_path):
    """The start-up message is the constructor's: one function says both."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    cfg = _ldm(tmp_path, "model.first_stage.ckpt_path=null", "model.diffusion.loss_type=l3")
    with pytest.raises(ConfigError) as start_up:
        validate_config(cfg)
    with pytest.raises(InstantiationException) as built:
        instantiate(cfg.model)
    for fragment in (
        "model.diffusion.loss_type='l3' is not supported",
        "model.first_stage.ckpt_path is null",
    ):
        assert fragment in str(start_up.value) and fragment in str(built.value)


class PatchBackbone(torch.nn.Module):
    """A DiT-like backbone: the latent cut into `patch_size` patches; no levels, no channel_mult."""

    def __init__(self, image_size: int, in_channels: int, out_channels: int, patch_size: int = 2) -> None:
        super().__init__()
        self.size_multiple = patch_size
        self.proj = torch.nn.Conv2d(in_channels, out_channels, patch_size, stride=patch_size)

    @classmethod
    def config_size_multiple(cls, config: dict[str, Any], key: str) -> tuple[int, str]:
        return int(config["patch_size"]), f"{key}.patch_size={config['patch_size']}: whole patches only"

    @classmethod
    def config_channels(cls, config: dict[str, Any], key: str) -> tuple[int, int]:
        return int(config["in_channels"]), int(config["out_channels"])


def _with_patch_backbone(tmp_path, patch_size: int, in_channels: int | None = None):
    cfg = _ldm(tmp_path)
    cfg.model.unet = OmegaConf.create(
        {
            "_target_": f"{__name__}.PatchBackbone",
            "image_size": "${model.image_size}",
            "in_channels": in_channels or "${segldm.add:${model.channels},${model.cond_stage.out_channels}}",
            "out_channels": "${model.channels}",
            "patch_size": patch_size,
        }
    )
    return cfg


def test_a_backbone_without_levels_plugs_into_the_size_and_channel_checks(tmp_path):
    validate_config(_with_patch_backbone(tmp_path, 8))  # 256 px / f4 = 64 px latent, 8 px patches
    with pytest.raises(ConfigError) as err:
        validate_config(_with_patch_backbone(tmp_path, 48, in_channels=5))
    message = str(err.value)
    assert "data.size=256 gives a 64px latent (first-stage factor 4), which is no multiple of 48" in message
    assert "model.unet.patch_size=48: whole patches only" in message and "divisible by 192" in message
    assert "model.unet.in_channels=5 but concat conditioning gives model.channels (3)" in message
    model = SimpleNamespace(
        first_stage_model=SimpleNamespace(downsample_factor=4),
        model=SimpleNamespace(diffusion_model=PatchBackbone(8, 6, 3, patch_size=8)),
    )
    assert size_multiple(model)[0] == 32  # masks for sampling ask the same backbone


class BareBackbone(torch.nn.Module):
    """A backbone that answers no start-up question: the rules needing its numbers are skipped."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.proj = torch.nn.Conv2d(in_channels, out_channels, 1)


def _with_bare_backbone(tmp_path, *overrides: str):
    cfg = _ldm(tmp_path, *overrides)
    cfg.model.unet = OmegaConf.create(
        {"_target_": f"{__name__}.BareBackbone", "in_channels": 6, "out_channels": "${model.channels}"}
    )
    return cfg


def test_a_backbone_that_answers_nothing_passes_and_masks_fall_back(tmp_path):
    validate_config(_with_bare_backbone(tmp_path, "data.size=260"))  # 65 px latent: no backbone rule
    with pytest.raises(ConfigError) as err:
        validate_config(_with_bare_backbone(tmp_path, "data.size=258"))  # the first stage still answers
    assert "data.size=258 is not divisible by the first stage's downsampling factor 4" in str(err.value)
    assert "which is no multiple of" not in str(err.value)
    model = SimpleNamespace(
        first_stage_model=SimpleNamespace(downsample_factor=4),
        model=SimpleNamespace(diffusion_model=BareBackbone(6, 3)),
    )
    assert size_multiple(model) == (4, "first-stage factor 4 x backbone size multiple 1")


def test_components_are_found_by_their_classes_not_their_names(tmp_path):
    components, problems = configured_components(_ldm(tmp_path))
    assert problems == [] and {"data", "model", "model.unet", "model.first_stage", "model.cond_stage"} <= set(
        components
    )
    with pytest.raises(ValueError, match="'startup_problem' is not a start-up question"):
        components["model"].ask("startup_problem")  # a typo is refused, not skipped
    assert Component("model.unet", BareBackbone, {}).ask("config_size_multiple") is None
    cfg = _ldm(tmp_path, "+model.schedule_fn._target_=math.sqrt", "+model.schedule_fn._partial_=true")
    components, problems = configured_components(cfg)  # a _target_ may name a function: it answers nothing
    assert problems == [] and components["model.schedule_fn"].ask("startup_problems") is None


def test_the_checkpoint_kind_is_the_model_class_s(tmp_path):
    """Resuming compares a checkpoint's kind with the one the model class writes (no table of names)."""
    assert model_kind(_ldm(tmp_path)) == "ldm"
    assert model_kind(_autoencoder(tmp_path)) == "autoencoder"
    cfg = _ldm(tmp_path)
    cfg.model._target_ = f"{__name__}.BareBackbone"
    assert model_kind(cfg) is None
    cfg.model._target_ = "segldm.nowhere.Model"
    assert model_kind(cfg) is None
