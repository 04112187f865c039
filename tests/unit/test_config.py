"""Every config group option composes; the seed reference values; start-up checks name both values."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from segldm.runtime.checks import ConfigError, validate_config
from tests.conftest import CONF, compose_train

GROUPS = {
    group: sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    for group in (
        "data",
        "model",
        "model/first_stage",
        "model/cond_stage",
        "scheduler",
        "trainer",
        "logger",
        "callbacks",
        "paths",
        "experiment",
        "hparams_search",
    )
}


def test_required_group_options_exist():
    assert {"ldm_seg", "autoencoder"} <= set(GROUPS["model"])
    assert {"vq_f4", "vq_f4_small"} <= set(GROUPS["model/first_stage"])
    assert {"spatial_rescaler"} <= set(GROUPS["model/cond_stage"])
    assert {"synthetic", "sflckr"} <= set(GROUPS["data"])
    assert {"lambda_linear", "cosine", "constant"} <= set(GROUPS["scheduler"])
    assert {"default", "cpu", "gpu", "debug"} <= set(GROUPS["trainer"])
    assert {"mlflow", "none"} <= set(GROUPS["logger"])


@pytest.mark.parametrize(
    "override", [f"{g}={o}" for g, opts in GROUPS.items() for o in opts], ids=lambda s: s.replace("/", ".")
)
def test_every_group_option_composes_and_resolves(override, tmp_path):
    cfg = compose_train([override, f"paths.output_root={tmp_path}", "paths.output_dir=" + str(tmp_path)])
    OmegaConf.resolve(cfg)
    assert cfg.model._target_


def test_seed_reference_configuration():
    cfg = compose_train(["model=ldm_seg", "data=sflckr", "paths.output_dir=/tmp/unused"])
    m = cfg.model
    d = m.diffusion
    assert (d.timesteps, d.linear_start, d.linear_end, d.loss_type) == (1000, 0.0015, 0.0205, "l1")
    assert (m.first_stage_key, m.cond_stage_key, m.conditioning_key) == ("image", "segmentation", "concat")
    assert (m.image_size, m.channels, m.optimization.base_learning_rate, m.cond_stage_trainable) == (
        64,
        3,
        1e-6,
        True,
    )
    assert (m.unet.in_channels, m.unet.out_channels, m.unet.model_channels) == (6, 3, 128)
    assert list(m.unet.channel_mult) == [1, 4, 8] and list(m.unet.attention_resolutions) == [32, 16, 8]
    assert (m.unet.num_heads, m.unet.num_res_blocks) == (8, 2)
    assert (m.first_stage.embed_dim, m.first_stage.n_embed) == (3, 8192)
    assert list(m.first_stage.ddconfig.ch_mult) == [1, 2, 4] and m.first_stage.ddconfig.ch == 128
    assert m.first_stage.ckpt_path.endswith("models/first_stage_models/vq-f4/model.ckpt")
    assert (m.cond_stage.n_stages, m.cond_stage.in_channels, m.cond_stage.out_channels) == (2, 182, 3)
    assert (cfg.data.batch_size, cfg.data.size, cfg.data.n_labels) == (12, 256, 182)
    s = cfg.scheduler
    assert list(s.warm_up_steps) == [10000] and list(s.f_start) == [1e-6] and list(s.f_max) == [1.0]


def test_unet_in_channels_is_derived():
    cfg = compose_train(["model.cond_stage.out_channels=5", "paths.output_dir=/tmp/unused"])
    assert cfg.model.unet.in_channels == 3 + 5


def test_unknown_option_is_hydras_error():
    with pytest.raises(ConfigCompositionException, match="nope"):
        compose_train(["model=nope"])
    with pytest.raises(ConfigCompositionException, match="not_a_key"):
        compose_train(["model.not_a_key=1"])


def _checked(overrides, tmp_path):
    ckpt = tmp_path / "fs.ckpt"
    ckpt.write_bytes(b"x")
    return compose_train(
        [
            f"paths.output_root={tmp_path}",
            "paths.output_dir=" + str(tmp_path),
            f"model.first_stage.ckpt_path={ckpt}",
            *overrides,
        ]
    )


def test_valid_default_passes(tmp_path):
    validate_config(_checked([], tmp_path))


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["data.size=66"], ["data.size=66", "downsampling factor 4", "64 or 80"]),
        (["model.cond_stage.in_channels=5"], ["model.cond_stage.in_channels=5", "data.n_labels=8"]),
        (["model.unet.in_channels=7"], ["model.unet.in_channels=7", "= 6"]),
        (["model.cond_stage.n_stages=3"], ["n_stages=3", "latent is 16px"]),
        (["model.optimization.base_learning_rate=0"], ["model.optimization.base_learning_rate=0"]),
        # the flat layout of segldm before the option groups, and a misspelt key in a group
        (
            ["+model.base_learning_rate=1e-4"],
            ["model.base_learning_rate moved to model.optimization.base_learning_rate"],
        ),
        (["+model.deterministic_validation=false"], ["model.validation.deterministic"]),
        (
            ["+model.diffusion.timestep=10"],
            ["model.diffusion has unknown key(s) ['timestep']", "'timesteps'"],
        ),
        (
            ["model.diffusion.zero_terminal_snr=true"],
            ["zero_terminal_snr=true with parameterization=eps", "parameterization=v"],
        ),
        (["data.batch_size=0"], ["data.batch_size=0"]),
        (["model.sampler.name=plms"], ["model.sampler.name='plms'", "dpm_solver++"]),
        # model.sampler is a typed group: a misspelt option names the options there are, a bad value its key
        (
            ["+model.sampler.spacng=uniform"],
            [
                "model.sampler.spacng='uniform' is not an option of ddim",
                "spacing (dpm_solver++, dpm_solver++_sde)",
            ],
        ),
        (
            ["model.sampler.name=dpm_solver++", "model.sampler.spacing=cubic"],
            ["model.sampler.spacing='cubic'"],
        ),
        (["model.first_stage.ckpt_path=/nowhere/vq.ckpt"], ["/nowhere/vq.ckpt", "model=autoencoder"]),
        (["model.first_stage.ckpt_path=null"], ["ckpt_path is null", "model=autoencoder"]),
        # DDIM step counts that CompVis's +1 shift takes to t = 1000 (an IndexError mid-run otherwise)
        (["model.sampler.steps=36"], ["model.sampler.steps=36", "t=1000", "35 or 38"]),
        (["callbacks.sample_grid.ddim_steps=9"], ["callbacks.sample_grid.ddim_steps=9", "8 or 10"]),
        (
            ["callbacks.generation_metrics.every_n_steps=2", "callbacks.generation_metrics.steps=3"],
            ["callbacks.generation_metrics.steps=3", "2 or 4"],
        ),
        (["data.size=72"], ["data.size=72", "18px latent", "divisible by 16", "64 or 80"]),
        (
            ["model.scale_by_std=true", "model.scale_factor=0.18215"],
            ["model.scale_by_std=true", "model.scale_factor=0.18215", "scale_factor=1.0"],
        ),
    ],
)
def test_mismatches_fail_at_start_naming_both_values(overrides, fragments, tmp_path):
    with pytest.raises(ConfigError) as err:
        validate_config(_checked(overrides, tmp_path))
    for fragment in fragments:
        assert fragment in str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.sampler.steps=35"],
        ["model.sampler.name=dpm_solver++", "model.sampler.steps=36"],  # no +1 shift there
        ["model.scale_by_std=true"],
    ],
)
def test_neighbouring_valid_settings_pass(overrides, tmp_path):
    validate_config(_checked(overrides, tmp_path))


def test_sflckr_missing_dataset_names_the_path(tmp_path):
    cfg = compose_train(["data=sflckr", f"paths.data_dir={tmp_path}/nodata", "paths.output_dir=/tmp/unused"])
    with pytest.raises(InstantiationException, match=f"SFLCKR dataset not found at {tmp_path}/nodata/sflckr"):
        instantiate(cfg.data)


def first(value):
    return value[0] if OmegaConf.is_list(value) else value


def test_scheduler_configs_instantiate_to_callables(tmp_path):
    """Each option's multiplier starts at its f_start, peaks at f_max (1 unless given) when its
    warm-up ends, and ends the run (trainer.max_steps) at its f_min (1 for constant)."""
    assert set(GROUPS["scheduler"]) == {"constant", "cosine", "lambda_linear"}
    for option in GROUPS["scheduler"]:
        cfg = compose_train([f"scheduler={option}", "paths.output_dir=/tmp/unused"])
        fn, s = instantiate(cfg.scheduler), cfg.scheduler
        warm_up, last = first(s.warm_up_steps), cfg.trainer.max_steps
        assert fn(0) == pytest.approx(first(s.f_start)), option
        assert fn(warm_up) == pytest.approx(first(s.get("f_max", 1.0))), option
        assert fn(last) == pytest.approx(first(s.get("f_min", 1.0))), option
        if warm_up:  # linear in between
            midway = (first(s.f_start) + first(s.get("f_max", 1.0))) / 2
            assert fn(warm_up // 2) == pytest.approx(midway, rel=1e-3), option


def test_repo_has_conf_root():
    assert (Path(CONF) / "train.yaml").is_file()
