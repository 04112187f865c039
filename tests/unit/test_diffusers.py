"""diffusers in and out: segldm's UNet, VQ autoencoder and schedule as diffusers models, the exported
pipeline against segldm's own generation, and a diffusers VQModel folder as the first stage.

Models are tiny and random (every weight non-zero, including the layers CompVis starts at zero), so a
wrong key, head order or schedule shows up as a large difference. Tolerances are for float32 on
the CPU: the two implementations compute the same functions with different kernels (linear
layers for 1x1 convolutions, F.silu for x * sigmoid(x)) and diffusers' float32 cumulative product
of the alphas, which differs from segldm's float64 one in the 7th digit.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from omegaconf import OmegaConf

from segldm.compat.diffusers.scheduler import scheduler_config
from segldm.compat.diffusers.unet import diffusers_unet_config
from segldm.compat.diffusers.unet import to_diffusers as unet_to_diffusers
from segldm.convert import main as convert_main
from segldm.diffusion.ddim import make_ddim_timesteps
from segldm.diffusion.schedule import make_beta_schedule, schedule_buffers
from segldm.models.autoencoder import VQModel
from segldm.models.diffusers_vq import (
    DiffusersLayoutError,
    ddconfig_from_diffusers,
    diffusers_config,
    from_diffusers,
    to_diffusers,
)
from segldm.models.unet import UNetModel
from segldm.pipeline.generation import SamplingSettings, generate
from segldm.runtime.checks import validate_config
from segldm.runtime.loading import build_ldm, ldm_checkpoint
from segldm.storage.checkpoint_files import CheckpointError, load_strict, save_checkpoint
from tests.conftest import TINY_DATA, TINY_FIRST_STAGE, TINY_UNET, compose_train
from tests.unit.test_compat_compvis import randomize

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# DiffusionPipeline.from_pretrained(trust_remote_code=True) copies the folder's code into this cache
os.environ.setdefault("HF_MODULES_CACHE", os.path.join(tempfile.gettempdir(), "segldm-tests-hf-modules"))
try:
    import diffusers
except ModuleNotFoundError:  # segldm[diffusers] not installed: only the refusals below run
    diffusers = None
needs_diffusers = pytest.mark.skipif(
    diffusers is None, reason="diffusers not installed: pip install 'segldm[diffusers]'"
)

IMAGE_TOL = 1e-4  # measured ~1e-6..1e-5 (docs/diffusers.md)
MODEL_TOL = 1e-5  # one UNet / autoencoder call


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------- the UNet
UNETS = {
    "seed_tiny": dict(channel_mult=[1, 1], num_res_blocks=1, attention_resolutions=[2], num_heads=2),
    "head_channels_scale_shift_updown": dict(
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[1, 2],
        num_head_channels=16,
        use_scale_shift_norm=True,
        resblock_updown=True,
    ),
    "attention_at_one_width": dict(
        channel_mult=[1, 2, 2], num_res_blocks=2, attention_resolutions=[4], num_heads=4
    ),
}


def random_unet(**kwargs) -> UNetModel:
    unet = UNetModel(image_size=8, in_channels=5, out_channels=3, model_channels=32, **kwargs)
    randomize(unet, 1)
    return unet.eval()


@needs_diffusers
@pytest.mark.parametrize("name", sorted(UNETS))
def test_unet_is_a_unet2dmodel(name):
    unet = random_unet(**UNETS[name])
    config = diffusers_unet_config(unet)
    theirs = diffusers.UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    load_strict(theirs, unet_to_diffusers(unet.state_dict(), unet), name, "UNet2DModel")
    x, t = torch.randn(2, 5, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 999])
    with torch.no_grad():
        ours, out = unet(x, t), theirs(x, t).sample
    assert ours.abs().mean() > 0.01  # a real signal, not zero-initialised output layers
    assert (ours - out).abs().max() < MODEL_TOL


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(channel_mult=[1, 2], attention_resolutions=[1, 2], num_heads=4),
            r"different head widths.*num_heads=4",
        ),
        (dict(channel_mult=[2, 2], attention_resolutions=[2], num_heads=2), r"channel_mult\[0\]=2"),
        (
            dict(channel_mult=[1, 1], attention_resolutions=[2], num_heads=2, conv_resample=False),
            "conv_resample=false",
        ),
    ],
)
def test_unets_without_a_unet2dmodel_equivalent_are_refused(kwargs, message):
    with pytest.raises(DiffusersLayoutError, match=message):
        diffusers_unet_config(random_unet(num_res_blocks=1, **kwargs))


# ---------------------------------------------------------------------------------------------------- the first stage
DDCONFIG = dict(
    double_z=False,
    z_channels=4,
    resolution=16,
    in_channels=3,
    out_ch=3,
    ch=32,
    ch_mult=[1, 2],
    num_res_blocks=1,
    attn_resolutions=[8],
    dropout=0.0,
)


@needs_diffusers
def test_vq_autoencoder_is_a_diffusers_vqmodel():
    vq = VQModel(DDCONFIG, n_embed=16, embed_dim=4)
    randomize(vq, 2)
    vq.eval()
    config = diffusers_config(DDCONFIG, 16, 4, scaling_factor=0.5)
    assert config["down_block_types"] == ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]
    theirs = diffusers.VQModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    mapped = to_diffusers(vq.state_dict(), DDCONFIG)
    load_strict(theirs, mapped, "vq", "VQModel")
    back = from_diffusers(mapped, DDCONFIG)
    assert back.keys() == vq.state_dict().keys()
    assert all(torch.equal(v, vq.state_dict()[k]) for k, v in back.items())
    rebuilt, n_embed, embed_dim = ddconfig_from_diffusers(config, "config")
    assert (rebuilt, n_embed, embed_dim) == (DDCONFIG, 16, 4)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        h, their_h = vq.encode(x), theirs.encode(x).latents
        assert (h - their_h).abs().max() < MODEL_TOL
        assert torch.equal(vq.quantize(h)[2][2], theirs.quantize(h)[2][2])  # the same codes
        decoded, their_decoded = vq.decode(h), theirs.decode(h).sample
        assert (decoded - their_decoded).abs().max() < MODEL_TOL


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"double_z": True}, "double_z=true"),
        ({"ch_mult": [2, 2]}, r"ch_mult\[0\]=2"),
        ({"resamp_with_conv": False}, "resamp_with_conv"),
    ],
)
def test_autoencoders_without_a_vqmodel_equivalent_are_refused(edit, message):
    with pytest.raises(DiffusersLayoutError, match=message):
        diffusers_config({**DDCONFIG, **edit}, 16, 4)


# ---------------------------------------------------------------------------------------------------- the schedule
@needs_diffusers
def test_scheduler_config_is_the_training_schedule_and_compvis_ddim():
    diffusion = {"timesteps": 1000, "beta_schedule": "linear", "linear_start": 0.0015, "linear_end": 0.0205}
    ours = schedule_buffers(make_beta_schedule("linear", 1000, 0.0015, 0.0205))
    scheduler = diffusers.DDIMScheduler.from_config(scheduler_config(diffusion))
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.steps_offset == 1
    assert torch.allclose(scheduler.alphas_cumprod, ours["alphas_cumprod"], rtol=2e-6, atol=0)
    assert float(scheduler.final_alpha_cumprod) == float(scheduler.alphas_cumprod[0])  # CompVis: not 1
    for steps in (10, 50, 200):
        scheduler.set_timesteps(steps)
        assert sorted(scheduler.timesteps.tolist()) == make_ddim_timesteps("uniform", steps, 1000).tolist()
    cosine = scheduler_config({**diffusion, "beta_schedule": "cosine", "parameterization": "v"})
    assert cosine["prediction_type"] == "v_prediction"
    betas = diffusers.DDIMScheduler.from_config(cosine).betas
    assert torch.equal(betas, torch.tensor(make_beta_schedule("cosine", 1000), dtype=torch.float32))
    with pytest.raises(DiffusersLayoutError, match="ddim_discretization='quad'"):
        scheduler_config(diffusion, {"ddim_discretization": "quad"})


# ---------------------------------------------------------------------------------------------------- the pipeline
EXPORT_ARCH = [  # heads by width, scale-shift norm, resblock resampling, attention in the first stage, a scale factor
    "model.unet.num_heads=-1",
    "+model.unet.num_head_channels=16",
    "+model.unet.use_scale_shift_norm=true",
    "+model.unet.resblock_updown=true",
    "model.first_stage.ddconfig.attn_resolutions=[16]",
    "model.scale_factor=0.5",
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("diffusers")
    cfg = compose_train([*TINY_DATA, *TINY_FIRST_STAGE, *TINY_UNET, *EXPORT_ARCH])
    config = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
    }
    model = build_ldm(config["model"])
    randomize(model, 0)
    with torch.no_grad():  # EMA shadows near, not equal to, the raw weights: the export must take them
        shadows = dict(model.model_ema.named_buffers())
        gen = torch.Generator().manual_seed(5)
        for name, param in model.model.named_parameters():
            shadows[model.model_ema.m_name2s_name[name]].copy_(
                param + 0.01 * torch.randn(param.shape, generator=gen)
            )
    ckpt = save_checkpoint(ldm_checkpoint(model.state_dict(), config, global_step=3), folder / "ldm.ckpt")
    out = folder / "pipeline"
    assert convert_main(["diffusers", str(ckpt), str(out)]) == 0
    return {"model": model.eval(), "config": config, "ckpt": ckpt, "out": out}


@needs_diffusers
def test_export_writes_a_folder_diffusers_loads(exported):
    out = exported["out"]
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_segldm", "SegLDMPipeline"]
    assert index["vqvae"] == ["diffusers", "VQModel"] and index["unet"] == ["diffusers", "UNet2DModel"]
    unet = diffusers.UNet2DModel.from_pretrained(out / "unet")
    assert (
        unet.config.in_channels == 3 + exported["model"].cond_stage_model.out_channels
    )  # latent + condition
    vqvae = diffusers.VQModel.from_pretrained(out / "vqvae")
    assert vqvae.config.scaling_factor == 0.5
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((out / "segldm.json").read_text())["unet_weights"] == "ema"
    # the pipeline code travels with the folder and needs only diffusers
    code = ast.parse((out / "pipeline_segldm.py").read_text())
    imported = {a.name for n in ast.walk(code) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(code) if isinstance(n, ast.ImportFrom) and n.module}
    assert not [m for m in imported if m.startswith("segldm")], imported
    assert (out / "cond_stage" / "pipeline_segldm.py").read_text() == (out / "pipeline_segldm.py").read_text()


def segldm_and_diffusers(exported, settings: SamplingSettings, pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1] for the same masks and per-sample seeds, from segldm's generate and the pipeline."""
    n_labels = exported["model"].condition.n_labels
    gen = torch.Generator().manual_seed(3)
    masks = [torch.randint(0, n_labels, (32, 32), generator=gen) for _ in range(2)]
    seeds = [11, 12]
    ours = (torch.stack(generate(exported["model"], masks, seeds, settings, progress=None).images) + 1) / 2
    theirs = pipe(
        torch.stack(masks),
        num_inference_steps=settings.steps,
        eta=settings.eta,
        guidance_scale=settings.guidance_scale or 1.0,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="pt",
    ).images
    return ours, theirs


@needs_diffusers
def test_diffusers_pipeline_generates_segldms_image(exported):
    """DiffusionPipeline.from_pretrained with the folder's own code, DDIM eta 0, 10 steps, same seeds."""
    pipe = diffusers.DiffusionPipeline.from_pretrained(exported["out"], trust_remote_code=True)
    assert type(pipe).__name__ == "SegLDMPipeline"
    pipe.set_progress_bar_config(disable=True)
    ours, theirs = segldm_and_diffusers(exported, SamplingSettings(sampler="ddim", steps=10, eta=0.0), pipe)
    assert ours.std() > 0.01  # a real image
    difference = float((ours - theirs).abs().max())
    print(f"DDIM-10 eta 0: max |segldm - diffusers| = {difference:.2e}")
    assert difference < IMAGE_TOL
    # before the decoder's quantization snaps both to the same codes
    model, masks = (
        exported["model"],
        torch.randint(
            0, exported["model"].condition.n_labels, (2, 32, 32), generator=torch.Generator().manual_seed(4)
        ),
    )
    generators = [torch.Generator().manual_seed(s) for s in (21, 22)]
    with torch.no_grad():
        latents = model.sample(model.get_learned_conditioning(masks), 10, 0.0, generators=generators)
    generators = [torch.Generator().manual_seed(s) for s in (21, 22)]
    their_latents = pipe(masks, num_inference_steps=10, generator=generators, output_type="latent").images
    latent_difference = float((latents - their_latents).abs().max() / latents.abs().max())
    print(f"DDIM-10 eta 0 latents: max |segldm - diffusers| / max |z| = {latent_difference:.2e}")
    assert latent_difference < MODEL_TOL


@needs_diffusers
def test_segldm_class_with_noise_and_guidance(exported):
    """segldm's own pipeline class (no code from the folder); eta 1 draws each step's noise per sample as
    segldm does, and guidance doubles the batch the same way."""
    from segldm.compat.diffusers import SegLDMPipeline, load_pipeline

    pipe = load_pipeline(exported["out"])
    assert isinstance(pipe, SegLDMPipeline)
    pipe.set_progress_bar_config(disable=True)
    settings = SamplingSettings(sampler="ddim", steps=5, eta=1.0, guidance_scale=2.0)
    ours, theirs = segldm_and_diffusers(exported, settings, pipe)
    difference = float((ours - theirs).abs().max())
    print(f"DDIM-5 eta 1, guidance 2: max |segldm - diffusers| = {difference:.2e}")
    assert difference < IMAGE_TOL


@needs_diffusers
def test_vqmodel_folder_is_a_first_stage(exported, tmp_path):
    """The export's vqvae/ as model.first_stage.ckpt_path: the same weights, the same reconstruction."""
    model, out = exported["model"], exported["out"]
    cfg = compose_train(
        [
            *TINY_DATA,
            *TINY_FIRST_STAGE,
            *TINY_UNET,
            *EXPORT_ARCH,
            f"model.first_stage.ckpt_path={out / 'vqvae'}",
        ]
    )
    validate_config(cfg)  # a folder is a valid first-stage path
    first = OmegaConf.to_container(cfg.model.first_stage, resolve=True)
    first.pop("_target_")
    vq = VQModel(**first)
    assert vq.loaded_from == str(out / "vqvae")
    for key, value in vq.state_dict().items():
        assert torch.equal(value, model.first_stage_model.state_dict()[key]), key
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(
            vq.decode(vq.encode(x)), model.first_stage_model.decode(model.first_stage_model.encode(x))
        )


@needs_diffusers
def test_folders_that_are_not_the_first_stage_are_named(exported):
    out = exported["out"]
    first = exported["config"]["model"]["first_stage"]

    def build(path, **edit) -> VQModel:
        return VQModel({**first["ddconfig"], **edit}, first["n_embed"], first["embed_dim"], ckpt_path=path)

    with pytest.raises(CheckpointError, match=r"holds a diffusers UNet2DModel .*not a VQModel"):
        build(out / "unet")
    with pytest.raises(CheckpointError, match=r"diffusers pipeline folder .*vqvae"):
        build(out)
    with pytest.raises(CheckpointError, match=r"set model\.first_stage\.ddconfig\.ch=32 \(config has 64\)"):
        build(out / "vqvae", ch=64)


@pytest.mark.slow  # a fresh interpreter with diffusers hidden: ~20 s of imports
def test_without_diffusers_the_command_names_the_extra(tmp_path):
    """segldm (convert included) imports without diffusers; the diffusers command says what to install."""
    code = (
        "import sys; import segldm, segldm.convert, segldm.compat.diffusers; "
        "assert 'diffusers' not in sys.modules, 'segldm imported diffusers'; "
        "sys.modules['diffusers'] = None; "
        f"sys.exit(segldm.convert.main(['diffusers', 'ldm.ckpt', r'{tmp_path / 'out'}']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "pip install 'segldm[diffusers]'" in proc.stderr
