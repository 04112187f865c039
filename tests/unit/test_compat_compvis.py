"""CompVis compatibility: load_compvis, convert/export, native checkpoints, init_from, sampling checks.

Every fixture folder (made with the reference code) goes through ``load_compvis`` and through a
convert -> ``load_ldm`` round trip, and every tensor in its ``io.pt`` is matched. Architectures the
fixtures do not cover are built here as CompVis configs plus random CompVis-layout checkpoints
(a CompVis checkpoint is the LatentDiffusion state_dict under ``state_dict``), against a model
assembled directly from segldm's modules with the CompVis semantics spelled out.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from segldm.compat.compvis import (
    CompVisConfigError,
    compvis_config_from_segldm,
    load_compvis,
    translate_config,
)
from segldm.compat.compvis.export import config_diff
from segldm.convert import convert_compvis, export_compvis
from segldm.diffusion.ddim import ddim_parameters, make_ddim_timesteps
from segldm.models.autoencoder import VQModel
from segldm.models.cond_stage import SpatialRescaler
from segldm.models.unet import UNetModel
from segldm.pipeline.masks import Mask, fit_mask
from segldm.runtime.loading import init_from_checkpoint, ldm_checkpoint, load_ldm
from segldm.runtime.run_plan import plan_run
from segldm.sample import sample as run_sample
from segldm.storage.checkpoint_files import CheckpointError, CheckpointWarning, save_checkpoint
from segldm.training.ldm import LatentDiffusion
from segldm.training.options import FLAT_OPTION_KEYS, OPTION_GROUPS
from tests.compvis_fixtures import load_io, model_fixture_dirs
from tests.conftest import CONF, TINY_DATA, TINY_UNET, compose_train

FIXTURES = model_fixture_dirs()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on the shared 2-core machine, 2 threads under load run convs ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


DDIM_KEYS = ("ddim/samples", "ddim/x_inter", "ddim/pred_x0")  # 10 chained UNet calls: 1e-3
INPUT_KEYS = (
    "batch_image",
    "batch_segmentation",
    "t",
    "noise",
    "ddim/x_T",
    "to_rgb/colorize",
    "train_step_seed",
)


# ---------------------------------------------------------------------------------------------- fixtures
def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|a - e| / max(1, max|e|): the fixture README's tolerance measure."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.detach().double().cpu() - expected.double()).abs().max().item() if expected.numel() else 0.0
    return err / max(1.0, expected.abs().max().item() if expected.numel() else 0.0)


def _meta(folder: Path) -> dict[str, Any]:
    path = folder / "meta.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def reference_errors(model: LatentDiffusion, folder: Path) -> dict[str, float]:
    """Relative error of every io.pt tensor recomputed through the CompVis-named API (0 = exact).

    Integer tensors count as 0 (equal) or inf. Raises for a key this function does not know, so
    a fixture that grows a key fails until the key is checked.
    """
    io = load_io(folder)
    harness = _meta(folder).get("harness", {})
    errors: dict[str, float] = {}

    def put(key: str, value: torch.Tensor) -> None:
        ref = io[key]
        if not ref.is_floating_point():
            same = value.shape == ref.shape and torch.equal(value.cpu().to(ref.dtype), ref)
            errors[key] = 0.0 if same else float("inf")
        else:
            errors[key] = _rel_err(value, ref)

    seg = io["batch_segmentation"].float().permute(0, 3, 1, 2)
    batch = {"image": io["batch_image"], "segmentation": io["batch_segmentation"].float()}
    t, noise = io["t"], io["noise"]
    for key in INPUT_KEYS:
        errors[key] = 0.0
    model.eval()
    with torch.no_grad():
        if "batch_segmentation_labels" in io:
            put("batch_segmentation_labels", io["batch_segmentation"].argmax(-1))
        put("x", model.get_input(batch, model.first_stage_key))
        h = model.encode_first_stage(io["x"])
        put("fs_h", h)
        z_q, qloss, (_, _, indices) = model.first_stage_model.quantize(io["fs_h"])
        put("fs_quant", z_q)
        put("fs_qloss", qloss)
        put("fs_indices", indices.reshape(io["fs_indices"].shape))
        put("z", model.get_first_stage_encoding(h))
        put("fs_dec", model.decode_first_stage(io["z"]))
        put("fs_dec_noquant", model.decode_first_stage(io["z"], force_not_quantize=True))
        put("cond", model.get_learned_conditioning(seg))
        put("x_noisy", model.q_sample(io["z"], t, noise))
        put("unet_input", torch.cat([io["x_noisy"], io["cond"]], dim=1))
        put("eps", model.apply_model(io["x_noisy"], t, io["cond"]))
        put("betas_float64", model.betas.double())
        put("lvlb_weights", model.lvlb_weights)

    # the loss and its gradients (cond recomputed inside the graph when the cond stage trains)
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(True):
        if model.cond_stage_trainable:
            cond = model.get_learned_conditioning(seg)
        else:
            with torch.no_grad():
                cond = model.get_learned_conditioning(seg)
        loss, logs = model.p_losses(io["z"], cond, t, noise)
        loss.backward()
    put("loss", loss)
    params = dict(model.named_parameters())
    for key in io:
        if key.startswith("loss_dict/"):
            put(key, logs[key.removeprefix("loss_dict/")])
        elif key.startswith("grad/"):
            put(key, params[key.removeprefix("grad/")].grad)

    # the seeded training step: t, noise and loss as drawn inside shared_step
    captured: dict[str, torch.Tensor] = {}
    q_sample = model.q_sample

    def capture(x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        captured["t"], captured["noise"] = t, noise
        return q_sample(x_start, t, noise)

    model.q_sample = capture  # type: ignore[method-assign]
    try:
        torch.manual_seed(int(io["train_step_seed"]))
        with torch.no_grad():
            step_loss, _ = model.shared_step(batch)
    finally:
        del model.q_sample
    put("train_step_loss", step_loss)
    put("train_step_t", captured["t"])
    put("train_step_noise", captured["noise"])
    model.eval()

    # learning-rate schedule of the translated config
    scheduler = instantiate(OmegaConf.create((model.segldm_config or {})["scheduler"]))
    if "lr_sched/factors" in io:
        put(
            "lr_sched/factors",
            torch.tensor([scheduler(int(s)) for s in io["lr_sched/steps"]], dtype=torch.float64),
        )
        errors["lr_sched/steps"] = 0.0

    # DDIM: timestep tables, coefficients, the sampled trajectory (EMA weights when present)
    for key in io:
        if key.startswith("ddim_timesteps/S"):
            steps = int(key.removeprefix("ddim_timesteps/S"))
            if int(io[key][-1]) >= model.num_timesteps:
                with pytest.raises(ValueError, match="out of range"):
                    make_ddim_timesteps("uniform", steps, model.num_timesteps)
                errors[key] = 0.0
            else:
                put(key, torch.as_tensor(make_ddim_timesteps("uniform", steps, model.num_timesteps)))
    steps = int(harness.get("ddim_steps", len(io["ddim/timesteps"])))
    eta = float(harness.get("ddim_eta", 0.0))
    timesteps = make_ddim_timesteps("uniform", steps, model.num_timesteps)
    table = ddim_parameters(model.alphas_cumprod, timesteps, eta)
    put("ddim/timesteps", table.timesteps)
    put("ddim/alphas", table.alphas)
    put("ddim/alphas_prev", table.alphas_prev)
    put("ddim/sigmas", table.sigmas)
    if "ddim/sigmas_eta1" in io:
        put("ddim/sigmas_eta1", ddim_parameters(model.alphas_cumprod, timesteps, 1.0).sigmas)
    with torch.no_grad():
        samples, inter = model.sample(
            io["cond"], steps=steps, eta=eta, x_T=io["ddim/x_T"], return_intermediates=True
        )
        put("ddim/samples", samples)
        put("ddim/x_inter", torch.stack(inter["x_inter"]))
        put("ddim/pred_x0", torch.stack(inter["pred_x0"]))
        ref_samples = io["ddim/samples"]
        _, _, (_, _, idx) = model.first_stage_model.quantize(ref_samples / model.scale_factor)
        put("ddim/indices", idx.reshape(io["ddim/indices"].shape))
        put("ddim/decoded", model.decode_first_stage(ref_samples))
        put("ddim/decoded_noquant", model.decode_first_stage(ref_samples, force_not_quantize=True))
        model.colorize = io["to_rgb/colorize"]
        put("to_rgb/out", model.to_rgb(seg))
    unknown = sorted(set(io) - set(errors))
    if unknown:
        raise KeyError(f"{folder}/io.pt has keys this test does not check yet: {unknown}")
    return errors


def _assert_reference(errors: dict[str, float], folder: Path) -> None:
    bad = {k: v for k, v in errors.items() if v > (1e-3 if k in DDIM_KEYS else 1e-4) or not np.isfinite(v)}
    assert not bad, f"{folder.name}: tensors off the reference: {bad}"


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[Path, Path]:
    """Every fixture converted once with segldm.convert compvis (folder -> native model.ckpt)."""
    out = {}
    for folder in FIXTURES:
        target = tmp_path_factory.mktemp(f"converted_{folder.name}")
        out[folder] = convert_compvis(folder / "config.yaml", folder / "model.ckpt", target)["ckpt"]
    return out


@pytest.mark.parametrize("folder", FIXTURES, ids=lambda p: p.name)
def test_fixture_through_load_compvis_matches_every_reference_tensor(folder):
    model = load_compvis(folder / "config.yaml", folder / "model.ckpt")
    assert isinstance(model, LatentDiffusion) and not model.training
    _assert_reference(reference_errors(model, folder), folder)


@pytest.mark.parametrize("folder", FIXTURES, ids=lambda p: p.name)
def test_fixture_through_convert_then_load_ldm_matches_every_reference_tensor(folder, converted):
    model = load_ldm(converted[folder])
    _assert_reference(reference_errors(model, folder), folder)


@pytest.mark.parametrize("folder", FIXTURES, ids=lambda p: p.name)
def test_convert_then_export_round_trips_bit_exactly(folder, converted, tmp_path):
    original = torch.load(folder / "model.ckpt", map_location="cpu", weights_only=True)
    paths = export_compvis(converted[folder], tmp_path / "exported")
    exported = torch.load(paths["ckpt"], map_location="cpu", weights_only=True)
    assert exported.keys() == {"state_dict", "global_step"}
    assert exported["global_step"] == original.get("global_step", 0)
    a, b = original["state_dict"], exported["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    # and the exported config converts back to the same segldm model config
    again = convert_compvis(paths["config"], paths["ckpt"], tmp_path / "again")
    first = torch.load(converted[folder], map_location="cpu", weights_only=True)
    second = torch.load(again["ckpt"], map_location="cpu", weights_only=True)
    strip = lambda m: {**m, "first_stage": {**m["first_stage"], "ckpt_path": None}}  # noqa: E731
    assert strip(first["segldm"]["config"]["model"]) == strip(second["segldm"]["config"]["model"])
    assert all(torch.equal(first["state_dict"][k], second["state_dict"][k]) for k in first["state_dict"])


# ---------------------------------------------------------------------------------------------- own architectures
def compvis_config(
    unet: dict[str, Any],
    ddconfig: dict[str, Any],
    n_embed: int,
    embed_dim: int,
    cond: dict[str, Any],
    image_size: int,
    **ldm: Any,
) -> dict[str, Any]:
    """A CompVis-schema LatentDiffusion config (what their YAML files hold)."""
    cond_channels = cond.get("out_channels") or cond["in_channels"]
    return {
        "model": {
            "base_learning_rate": 2.0e-6,
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {
                "image_size": image_size,
                "channels": embed_dim,
                "first_stage_key": "image",
                "cond_stage_key": "segmentation",
                "unet_config": {
                    "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                    "params": {
                        "image_size": image_size,
                        "in_channels": embed_dim + cond_channels,
                        "out_channels": embed_dim,
                        **unet,
                    },
                },
                "first_stage_config": {
                    "target": "ldm.models.autoencoder.VQModelInterface",
                    "params": {
                        "embed_dim": embed_dim,
                        "n_embed": n_embed,
                        "ddconfig": ddconfig,
                        "lossconfig": {"target": "torch.nn.Identity"},
                    },
                },
                "cond_stage_config": {
                    "target": "ldm.modules.encoders.modules.SpatialRescaler",
                    "params": cond,
                },
                **ldm,
            },
        }
    }


def direct_model(cfg: dict[str, Any], use_ema: bool | None = None) -> LatentDiffusion:
    """The same model assembled from segldm's modules, CompVis defaults written out by hand."""
    p = cfg["model"]["params"]
    first = p["first_stage_config"]["params"]
    return LatentDiffusion(
        UNetModel(**p["unet_config"]["params"]),
        VQModel(ddconfig=first["ddconfig"], n_embed=first["n_embed"], embed_dim=first["embed_dim"]),
        SpatialRescaler(**p["cond_stage_config"]["params"]),
        diffusion={
            "timesteps": p.get("timesteps", 1000),
            "beta_schedule": p.get("beta_schedule", "linear"),
            "linear_start": p.get("linear_start", 1e-4),
            "linear_end": p.get("linear_end", 2e-2),
            "loss_type": p.get("loss_type", "l2"),
            "parameterization": p.get("parameterization", "eps"),
        },
        first_stage_key=p.get("first_stage_key", "image"),
        cond_stage_key=p.get("cond_stage_key", "image"),
        image_size=p["image_size"],
        channels=p["channels"],
        cond_stage_trainable=p.get("cond_stage_trainable", False),
        scale_factor=p.get("scale_factor", 1.0),
        scale_by_std=p.get("scale_by_std", False),
        use_ema=p.get("use_ema", True) if use_ema is None else use_ema,
        require_pretrained_first_stage=False,
    )


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random non-zero weights everywhere (the reference zero-inits residual outputs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("first_stage_model.quantize"):
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(
                    torch.randn(p.shape, generator=gen) * 0.05
                    + (1.0 if name.endswith("norm.weight") else 0.0)
                )


# input+output-block attention with head channels, scale-shift norm, resblock up/down, 4 latent
# channels, f2 first stage with attention, scale_factor 0.5, EMA weights, l2, frozen cond stage
ARCH_EMA = compvis_config(
    unet={
        "model_channels": 32,
        "attention_resolutions": [1, 2],
        "num_res_blocks": 1,
        "channel_mult": [1, 2],
        "num_head_channels": 16,
        "use_scale_shift_norm": True,
        "resblock_updown": True,
    },
    ddconfig={
        "double_z": False,
        "z_channels": 4,
        "resolution": 16,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 32,
        "ch_mult": [1, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [16, 8],
        "dropout": 0.0,
    },
    n_embed=16,
    embed_dim=4,
    cond={"n_stages": 1, "in_channels": 5, "out_channels": 2},
    image_size=8,
    scale_factor=0.5,
    linear_start=0.0015,
    linear_end=0.0205,
    log_every_t=200,
    monitor="val/loss_simple_ema",
)
# scale_by_std (scale_factor buffer), x0 target, cosine betas over 200 steps, num_heads with
# legacy=False, attention only at ds 4 (deepest input level and first output levels), f4 first
# stage, cond stage without channel mapper (cond channels = labels), trainable cond, l1, no EMA
ARCH_STD = compvis_config(
    unet={
        "model_channels": 32,
        "attention_resolutions": [4],
        "num_res_blocks": 2,
        "channel_mult": [1, 1, 2],
        "num_heads": 2,
        "num_heads_upsample": 1,
        "legacy": False,
        "conv_resample": False,
    },
    ddconfig={
        "double_z": False,
        "z_channels": 3,
        "resolution": 32,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 32,
        "ch_mult": [1, 1, 1],
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "dropout": 0.0,
    },
    n_embed=32,
    embed_dim=3,
    cond={"n_stages": 2, "in_channels": 3},
    image_size=8,
    timesteps=200,
    beta_schedule="cosine",
    parameterization="x0",
    loss_type="l1",
    scale_by_std=True,
    use_ema=False,
    conditioning_key="concat",
    cond_stage_trainable=True,
)
ARCHS = {"ema_attention_everywhere": ARCH_EMA, "scale_by_std_x0": ARCH_STD}


def write_arch(tmp_path: Path, cfg: dict[str, Any], seed: int = 0) -> tuple[Path, Path, LatentDiffusion]:
    """config.yaml + model.ckpt of a random model of ``cfg``; returns them and the direct model."""
    model = direct_model(cfg)
    randomize(model, seed)
    with torch.no_grad():
        if model.use_ema:  # distinct EMA shadows, so a test can tell which weights sampled
            for name, buf in model.model_ema.named_buffers():
                if name not in ("decay", "num_updates"):
                    buf.copy_(
                        torch.randn(buf.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05
                    )
            model.model_ema.decay.fill_(0.995)
            model.model_ema.num_updates.fill_(321)
        if model.scale_by_std:
            model.scale_factor.fill_(0.37)
    tmp_path.mkdir(parents=True, exist_ok=True)
    config_path, ckpt_path = tmp_path / "config.yaml", tmp_path / "model.ckpt"
    OmegaConf.save(OmegaConf.create(cfg), config_path)
    torch.save({"state_dict": model.state_dict(), "global_step": 1234}, ckpt_path)
    return config_path, ckpt_path, model.eval()


def batch_for(model: LatentDiffusion, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    size = model.image_size * model.first_stage_model.downsample_factor
    labels = torch.randint(0, model.cond_stage_model.in_channels, (2, size, size), generator=gen)
    return {
        "image": torch.rand(2, size, size, 3, generator=gen) * 2 - 1,
        "segmentation": torch.nn.functional.one_hot(labels, model.cond_stage_model.in_channels).float(),
    }


def assert_same_outputs(loaded: LatentDiffusion, direct: LatentDiffusion) -> None:
    """Encode, decode, cond, UNet, seeded train loss and EMA/raw DDIM agree between two models."""
    batch = batch_for(direct)
    x = direct.get_input(batch, "image")
    seg = direct.get_input(batch, "segmentation")
    t = torch.tensor([3, direct.num_timesteps - 1])
    with torch.no_grad():
        z = direct.get_first_stage_encoding(direct.encode_first_stage(x))
        assert torch.equal(loaded.get_first_stage_encoding(loaded.encode_first_stage(x)), z)
        assert torch.equal(loaded.decode_first_stage(z), direct.decode_first_stage(z))
        c = direct.get_learned_conditioning(seg)
        assert torch.equal(loaded.get_learned_conditioning(seg), c)
        noise = torch.randn_like(z)
        assert torch.equal(loaded.q_sample(z, t, noise), direct.q_sample(z, t, noise))
        assert torch.equal(loaded.apply_model(z, t, c), direct.apply_model(z, t, c))
        for use_ema in (True, False):
            x_T = torch.randn_like(z)
            a = loaded.sample(c, steps=4, eta=0.0, x_T=x_T, use_ema=use_ema)
            b = direct.sample(c, steps=4, eta=0.0, x_T=x_T, use_ema=use_ema)
            assert torch.equal(a, b)
    losses = []
    for model in (loaded, direct):
        model.train()
        torch.manual_seed(7)
        losses.append(model.shared_step(batch)[0].detach())
        model.eval()
    assert torch.equal(losses[0], losses[1])


@pytest.mark.parametrize("name", ARCHS)
def test_other_architectures_load_strictly_and_compute_the_same(name, tmp_path):
    cfg = ARCHS[name]
    config_path, ckpt_path, direct = write_arch(tmp_path, cfg)
    loaded = load_compvis(config_path, ckpt_path)
    assert loaded.state_dict().keys() == direct.state_dict().keys()
    assert float(loaded.scale_factor) == float(direct.scale_factor)
    assert loaded.use_ema == direct.use_ema and loaded.cond_stage_trainable == direct.cond_stage_trainable
    assert_same_outputs(loaded, direct)
    # convert -> native checkpoint -> load_ldm gives the same model, export gives the same file
    paths = convert_compvis(config_path, ckpt_path, tmp_path / "converted")
    native = torch.load(paths["ckpt"], map_location="cpu", weights_only=True)
    assert native["global_step"] == 1234 and native["segldm"]["kind"] == "ldm"
    data = native["segldm"]["config"]["data"]
    factor = direct.first_stage_model.downsample_factor
    assert data["size"] == cfg["model"]["params"]["image_size"] * factor
    assert data["n_labels"] == cfg["model"]["params"]["cond_stage_config"]["params"]["in_channels"]
    assert_same_outputs(load_ldm(paths["ckpt"]), direct)
    exported = export_compvis(paths["ckpt"], tmp_path / "exported")["ckpt"]
    original = torch.load(ckpt_path, weights_only=True)["state_dict"]
    back = torch.load(exported, weights_only=True)["state_dict"]
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)


def flat_layout(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """A grouped model config written the way segldm stored it before the option groups."""
    out = {k: v for k, v in model_cfg.items() if k not in OPTION_GROUPS}
    for name, (group, key) in FLAT_OPTION_KEYS.items():
        if key in (model_cfg.get(group) or {}):
            out[name] = model_cfg[group][key]
    return out


def test_checkpoints_of_the_flat_layout_load_into_the_option_groups(tmp_path):
    """A checkpoint written before model.diffusion/optimization/performance/validation existed loads
    as the same model (the stored config is grouped on load), and init_from reads its
    parameterization from the flat key."""
    config_path, ckpt_path, direct = write_arch(tmp_path, ARCH_STD)
    paths = convert_compvis(config_path, ckpt_path, tmp_path / "converted")
    native = torch.load(paths["ckpt"], map_location="cpu", weights_only=True)
    grouped = native["segldm"]["config"]["model"]
    assert grouped["diffusion"]["parameterization"] == "x0" and grouped["diffusion"]["timesteps"] == 200
    old = copy.deepcopy(native)
    old["segldm"]["config"]["model"] = flat_layout(grouped)
    assert (
        "diffusion" not in old["segldm"]["config"]["model"]
        and old["segldm"]["config"]["model"]["timesteps"] == 200
    )
    old_path = tmp_path / "old.ckpt"
    torch.save(old, old_path)
    loaded = load_ldm(old_path)
    assert loaded.segldm_config["model"]["diffusion"] == grouped["diffusion"]
    assert loaded.num_timesteps == 200 and loaded.parameterization == "x0"
    assert_same_outputs(loaded, direct)
    eps_model = direct_model(
        copy.deepcopy(ARCH_STD)
        | {
            "model": {
                **ARCH_STD["model"],
                "params": {**ARCH_STD["model"]["params"], "parameterization": "eps"},
            }
        }
    )
    with pytest.raises(CheckpointError, match="model.diffusion.parameterization='x0'"):
        init_from_checkpoint(eps_model, old_path)


def test_scale_by_std_keeps_the_checkpoint_factor(tmp_path):
    config_path, ckpt_path, _ = write_arch(tmp_path, ARCH_STD)
    model = load_compvis(config_path, ckpt_path)
    assert model.scale_by_std and torch.isclose(model.scale_factor, torch.tensor(0.37))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    h = model.encode_first_stage(x)
    assert torch.allclose(model.get_first_stage_encoding(h), 0.37 * h)


def test_sample_uses_the_ema_weights_of_the_checkpoint(tmp_path):
    config_path, ckpt_path, direct = write_arch(tmp_path, ARCH_EMA)
    loaded = load_compvis(config_path, ckpt_path)
    assert loaded.use_ema and float(loaded.model_ema.decay) == pytest.approx(0.995)
    assert int(loaded.model_ema.num_updates) == 321 and loaded.model_ema.num_updates.dtype == torch.int32
    # a model without EMA whose UNet *is* the shadows (names without dots, as CompVis stores them)
    shadows = {
        k.removeprefix("model_ema."): v for k, v in direct.state_dict().items() if k.startswith("model_ema.")
    }
    as_ema = direct_model(ARCH_EMA, use_ema=False)
    state = {k: v for k, v in direct.state_dict().items() if not k.startswith("model_ema.")}
    for name, _ in as_ema.model.named_parameters():
        state["model." + name] = shadows[name.replace(".", "")]
    as_ema.load_state_dict(state, strict=True)
    as_ema.eval()
    c = torch.randn(2, 2, 8, 8)
    x_T = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ema_sample = loaded.sample(c, steps=5, eta=0.0, x_T=x_T)
        assert torch.allclose(ema_sample, as_ema.sample(c, steps=5, eta=0.0, x_T=x_T), atol=1e-6)
        raw = loaded.sample(c, steps=5, eta=0.0, x_T=x_T, use_ema=False)
    assert (raw - ema_sample).abs().max() > 1e-3  # the shadows really differ from the raw weights
    # ema_scope swaps them in and restores the raw weights afterwards
    before = [p.clone() for p in loaded.model.parameters()]
    with loaded.ema_scope():
        assert not all(torch.equal(a, b) for a, b in zip(before, loaded.model.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(before, loaded.model.parameters(), strict=True))


def test_use_ema_without_ema_weights_warns_and_uses_the_raw_weights(tmp_path):
    cfg = copy.deepcopy(ARCH_EMA)
    model = direct_model(cfg, use_ema=False)
    randomize(model, 1)
    config_path, ckpt_path = tmp_path / "config.yaml", tmp_path / "model.ckpt"
    OmegaConf.save(OmegaConf.create(cfg), config_path)
    torch.save({"state_dict": model.state_dict(), "global_step": 0}, ckpt_path)
    with pytest.warns(CheckpointWarning, match="no model_ema"):
        loaded = load_compvis(config_path, ckpt_path)
    assert not loaded.use_ema
    c, x_T = torch.randn(1, 2, 8, 8), torch.randn(1, 4, 8, 8)
    assert torch.equal(
        loaded.sample(c, steps=4, eta=0.0, x_T=x_T), model.eval().sample(c, steps=4, eta=0.0, x_T=x_T)
    )
    # the reverse: EMA weights present but the config says use_ema: false -> ignored, with a warning
    _, ema_ckpt, _ = write_arch(tmp_path / "ema", ARCH_EMA)
    cfg["model"]["params"]["use_ema"] = False
    OmegaConf.save(OmegaConf.create(cfg), config_path)
    with pytest.warns(CheckpointWarning, match="holds EMA weights"):
        assert not load_compvis(config_path, ema_ckpt).use_ema


# ---------------------------------------------------------------------------------------------- config translation
def _fixture_config() -> dict[str, Any]:
    return copy.deepcopy(ARCH_EMA)


def _edit(path: str, value: Any, base: dict[str, Any] = ARCH_EMA) -> dict[str, Any]:
    """A copy of ``base`` with the dotted ``path`` set to ``value``."""
    cfg = copy.deepcopy(base)
    node = cfg
    *parents, last = path.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    return cfg


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (
            "model.params.cond_stage_config",
            "__is_unconditional__",
            "cond_stage_config='__is_unconditional__'",
        ),
        ("model.params.conditioning_key", "crossattn", "conditioning_key='crossattn'"),
        ("model.params.concat_mode", False, "concat_mode=false"),
        ("model.params.unet_config.params.use_spatial_transformer", True, "use_spatial_transformer=True"),
        ("model.params.unet_config.params.context_dim", 768, "context_dim=768"),
        ("model.params.parameterization", "v", "parameterization='v'"),
        ("model.params.num_timesteps_cond", 5, "num_timesteps_cond=5"),
        ("model.params.learn_logvar", True, "learn_logvar=True"),
        ("model.params.frobnicate", 1, "frobnicate"),
        ("model.params.unet_config.params.use_linear_in_transformer", True, "use_linear_in_transformer"),
        ("model.params.first_stage_config.target", "ldm.models.autoencoder.AutoencoderKL", "AutoencoderKL"),
        ("model.params.first_stage_config.params.remap", "remap.npy", "remap='remap.npy'"),
        ("model.params.first_stage_config.params.ddconfig.attn_type", "linear", "attn_type='linear'"),
        (
            "model.params.scheduler_config",
            {"target": "ldm.lr_scheduler.LambdaWarmUpCosineScheduler", "params": {}},
            "LambdaWarmUpCosineScheduler",
        ),
        ("model.params.channels", 5, "channels=5"),
        ("model.target", "ldm.models.diffusion.ddpm.DDPM", "DDPM"),
    ],
)
def test_unsupported_compvis_settings_are_refused_naming_the_key(path, value, message):
    with pytest.raises(CompVisConfigError, match=re.escape(message)):
        translate_config(_edit(path, value))


def test_harmless_keys_are_accepted_and_defaults_are_compvis_ones():
    cfg = _fixture_config()
    params = cfg["model"]["params"]
    params.update(log_every_t=100, monitor="val/loss", ignore_keys=[], ckpt_path="x.ckpt", clip_denoised=True)
    params["first_stage_config"]["params"].update(
        monitor="val/rec_loss", image_key="image", ckpt_path="vq.ckpt"
    )
    params["first_stage_config"]["params"]["ddconfig"]["attn_type"] = "vanilla"
    for key in ("cond_stage_trainable", "first_stage_key", "cond_stage_key"):
        params.pop(key, None)
    model = translate_config(cfg).model
    # CompVis defaults, not segldm's: frozen cond stage, cond key "image"
    assert model["cond_stage_trainable"] is False and model["cond_stage_key"] == "image"
    assert model["first_stage"]["ckpt_path"] is None  # the LDM checkpoint holds the first stage
    assert model["unet"]["_target_"] == "segldm.models.unet.UNetModel"
    assert "attn_type" not in model["first_stage"]["ddconfig"]


def test_a_config_without_scheduler_trains_at_constant_lr():
    translation = translate_config(_fixture_config())
    assert translation.scheduler_group == "constant"
    scheduler = instantiate(OmegaConf.create(translation.scheduler))
    assert scheduler(0) == scheduler(10**6) == 1.0


def test_export_keeps_segldm_only_settings_in_a_section_compvis_ignores(tmp_path):
    cfg = compose_train([*TINY_DATA, *TINY_UNET, "model/first_stage=vq_f4_small", "model.ema_decay=0.99",
                         "model.sampler.steps=20", "scheduler=cosine", "trainer.max_steps=100",
                         "paths.output_dir=/tmp/unused"])  # fmt: skip
    run_config = OmegaConf.to_container(cfg, resolve=True)
    with pytest.warns(UserWarning, match="CosineScheduler"):
        compvis = compvis_config_from_segldm(run_config)
    assert "scheduler_config" not in compvis["model"]["params"]
    assert compvis["segldm"]["model"]["ema_decay"] == 0.99
    assert compvis["segldm"]["scheduler_group"] == "cosine" and compvis["segldm"]["data_group"] == "synthetic"
    back = translate_config(compvis)
    ours = {**run_config["model"], "first_stage": {**run_config["model"]["first_stage"], "ckpt_path": None}}
    # every setting comes back unchanged; the translation only adds constructor defaults
    assert config_diff(ours, back.model) == {}
    assert back.scheduler == run_config["scheduler"]
    top_level = {k: v for k, v in run_config["data"].items() if k != "_target_" and not isinstance(v, dict)}
    assert back.data == top_level and back.data["size"] == 32 and back.data_group == "synthetic"


# ---------------------------------------------------------------------------------------------- checkpoint kinds and safety
@pytest.fixture
def arch_files(tmp_path) -> tuple[Path, Path]:
    config_path, ckpt_path, _ = write_arch(tmp_path, ARCH_STD)
    return config_path, ckpt_path


def test_pickled_objects_need_the_trust_flag(arch_files, tmp_path):
    config_path, ckpt_path = arch_files
    unsafe = tmp_path / "unsafe.ckpt"
    checkpoint = torch.load(ckpt_path, weights_only=True)
    torch.save({**checkpoint, "hparams": argparse.Namespace(lr=1.0)}, unsafe)
    with pytest.raises(CheckpointError, match="trust_checkpoint") as info:
        load_compvis(config_path, unsafe)
    assert str(unsafe) in str(info.value) and "argparse.Namespace" in str(info.value)
    assert load_compvis(config_path, unsafe, trust_checkpoint=True).num_timesteps == 200


def test_wrong_kinds_of_checkpoint_are_named(arch_files, tmp_path):
    config_path, ckpt_path = arch_files
    sd = torch.load(ckpt_path, weights_only=True)["state_dict"]
    vq = tmp_path / "vq.ckpt"
    torch.save(
        {
            "state_dict": {
                k.removeprefix("first_stage_model."): v
                for k, v in sd.items()
                if k.startswith("first_stage_model.")
            }
        },
        vq,
    )
    with pytest.raises(
        CheckpointError,
        match=r"expected a CompVis LatentDiffusion checkpoint, but this is a CompVis/taming VQ",
    ) as info:
        load_compvis(config_path, vq)
    assert str(vq) in str(info.value) and "first_stage_config.params.ckpt_path" in str(info.value)
    native = convert_compvis(config_path, ckpt_path, tmp_path / "native")["ckpt"]
    with pytest.raises(CheckpointError, match=r"this is a segldm LDM checkpoint.*load_ldm"):
        load_compvis(config_path, native)
    with pytest.raises(
        CheckpointError,
        match=r"expected a segldm LDM checkpoint, but this is a CompVis LatentDiffusion.*segldm\.convert compvis",
    ):
        load_ldm(ckpt_path)
    with pytest.raises(
        CheckpointError, match="expected a segldm LDM checkpoint, but this is a CompVis/taming VQ"
    ):
        load_ldm(vq)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt_path.read_bytes()[:5000])
    for loader in (
        lambda p: load_compvis(config_path, p),
        load_ldm,
        lambda p: export_compvis(p, tmp_path / "x"),
    ):
        with pytest.raises(CheckpointError, match=re.escape(str(truncated)) + ".*truncated or corrupt"):
            loader(truncated)


def test_checkpoint_of_another_config_names_the_keys(arch_files, tmp_path):
    config_path, ckpt_path = arch_files
    cfg = _edit("model.params.unet_config.params.model_channels", 64, ARCH_STD)
    other = tmp_path / "other.yaml"
    OmegaConf.save(OmegaConf.create(cfg), other)
    with pytest.raises(CheckpointError, match=r"shape mismatch.*model\.diffusion_model\.") as info:
        load_compvis(other, ckpt_path)
    assert str(ckpt_path) in str(info.value)
    sd = torch.load(ckpt_path, weights_only=True)["state_dict"]
    del sd["model.diffusion_model.out.2.bias"]
    broken = tmp_path / "broken.ckpt"
    torch.save({"state_dict": sd}, broken)
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): model\.diffusion_model\.out\.2\.bias"):
        load_compvis(config_path, broken)
    # a different noise schedule in the config: the checkpoint's buffers give it away
    wrong_schedule = tmp_path / "schedule.yaml"
    OmegaConf.save(OmegaConf.create(_edit("model.params.beta_schedule", "linear", ARCH_STD)), wrong_schedule)
    with pytest.raises(CheckpointError, match="noise schedule buffers"):
        load_compvis(wrong_schedule, ckpt_path)
    # a scale_factor buffer (scale_by_std) with a config that does not say so
    no_std = tmp_path / "no_std.yaml"
    OmegaConf.save(OmegaConf.create(_edit("model.params.scale_by_std", False, ARCH_STD)), no_std)
    with pytest.raises(CheckpointError, match="scale_by_std"):
        load_compvis(no_std, ckpt_path)


def test_first_stage_of_compvis_layout_loads_through_the_config_path(tmp_path):
    """model.first_stage.ckpt_path=<CompVis VQ file with loss.* keys> in a composed LDM config."""
    if not FIXTURES:
        pytest.skip("no CompVis fixture")
    folder = FIXTURES[0]
    sd = torch.load(folder / "model.ckpt", weights_only=True)["state_dict"]
    first = {
        k.removeprefix("first_stage_model."): v for k, v in sd.items() if k.startswith("first_stage_model.")
    }
    vq_file = tmp_path / "vq-f4" / "model.ckpt"
    vq_file.parent.mkdir()
    loss = {
        "loss.discriminator.main.0.weight": torch.zeros(2, 3, 4, 4),
        "loss.perceptual_loss.lin0.model.1.weight": torch.ones(1, 64, 1, 1),
    }
    torch.save({"state_dict": {**first, **loss}, "global_step": 5}, vq_file)
    params = translate_config(folder / "config.yaml").model["first_stage"]
    dd = params["ddconfig"]
    overrides = [
        *TINY_DATA,
        *TINY_UNET,
        "model/first_stage=vq_f4_small",
        f"data.size={dd['resolution']}",
        f"model.first_stage.ddconfig.ch={dd['ch']}",
        f"model.first_stage.ddconfig.ch_mult={dd['ch_mult']}",
        f"model.first_stage.ddconfig.num_res_blocks={dd['num_res_blocks']}",
        f"model.first_stage.ddconfig.z_channels={dd['z_channels']}",
        f"model.first_stage.embed_dim={params['embed_dim']}",
        f"model.first_stage.n_embed={params['n_embed']}",
        f"model.first_stage.ckpt_path={vq_file}",
        f"model.cond_stage.n_stages={len(dd['ch_mult']) - 1}",
        "paths.output_dir=/tmp/unused",
    ]
    model = instantiate(compose_train(overrides).model)
    assert model.first_stage_model.loaded_from == str(vq_file)
    assert all(torch.equal(model.first_stage_model.state_dict()[k], v) for k, v in first.items())
    io = load_io(folder)
    assert torch.allclose(model.encode_first_stage(io["x"]), io["fs_h"], atol=1e-4)
    wrong = compose_train([*overrides[:-2], "model.first_stage.n_embed=7", *overrides[-2:]])
    with pytest.raises(
        Exception, match=r"quantize\.embedding\.weight: checkpoint \(\d+, \d+\) vs model \(7, "
    ):
        instantiate(wrong.model)


# ---------------------------------------------------------------------------------------------- native checkpoints, init_from
def test_init_from_loads_weights_strictly_and_restarts_the_ema(arch_files, tmp_path):
    config_path, ckpt_path = arch_files
    native = convert_compvis(config_path, ckpt_path, tmp_path / "native")["ckpt"]
    run = OmegaConf.to_container(OmegaConf.load(tmp_path / "native" / "config.yaml"))
    model = instantiate(
        OmegaConf.create(
            {
                **run["model"],
                "use_ema": True,
                "first_stage": {**run["model"]["first_stage"], "ckpt_path": None},
                "require_pretrained_first_stage": False,
            }
        )
    )
    with pytest.warns(CheckpointWarning, match="EMA starts from the loaded weights"):
        init_from_checkpoint(model, native)
    source = load_ldm(native)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    shadows = dict(model.model_ema.named_buffers())
    for name, p in model.model.named_parameters():
        assert torch.equal(shadows[name.replace(".", "")], p)
    assert model._restarted_from_ckpt  # scale_by_std keeps the checkpoint's factor
    other = instantiate(
        OmegaConf.create(
            {
                **run["model"],
                "unet": {**run["model"]["unet"], "num_res_blocks": 1},
                "first_stage": {**run["model"]["first_stage"], "ckpt_path": None},
                "require_pretrained_first_stage": False,
            }
        )
    )
    with pytest.raises(
        CheckpointError,
        match=r"init_from needs the same architecture.*unexpected key\(s\): model\.diffusion_model\.",
    ):
        init_from_checkpoint(other, native)


def test_native_checkpoint_without_config_is_refused(arch_files, tmp_path):
    config_path, ckpt_path = arch_files
    sd = torch.load(ckpt_path, weights_only=True)["state_dict"]
    path = save_checkpoint(
        {**ldm_checkpoint(sd, {}), "segldm": {"kind": "ldm", "config": None}}, tmp_path / "x.ckpt"
    )
    with pytest.raises(CheckpointError, match="no config with a 'model' entry"):
        load_ldm(path)


# ---------------------------------------------------------------------------------------------- sample entry point
def _sample_cfg(tmp_path: Path, **values: Any):
    from hydra import compose, initialize_config_dir

    overrides = [f"{k}={v}" for k, v in values.items()]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="sample", overrides=[f"out_dir={tmp_path / 'out'}", *overrides])


def _masks(folder: Path, arrays: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, labels in arrays.items():
        Image.fromarray(labels.astype(np.uint8), mode="L").save(folder / f"{name}.png")
    return folder


def test_sample_writes_images_independent_of_the_batch(arch_files, tmp_path):
    config_path, ckpt_path = arch_files
    native = convert_compvis(config_path, ckpt_path, tmp_path / "native")["ckpt"]
    rng = np.random.default_rng(0)
    masks = _masks(tmp_path / "masks", {f"m{i}": rng.integers(0, 3, (32, 32)) for i in range(3)})
    together = run_sample(_sample_cfg(tmp_path / "a", ckpt=native, masks=masks, steps=3, batch_size=3))
    alone = run_sample(_sample_cfg(tmp_path / "b", ckpt=native, masks=masks, steps=3, batch_size=1))
    assert together["count"] == 3 and (together["out_dir"] / "grid.png").is_file()
    for name in ("m0", "m1", "m2"):
        a = np.asarray(Image.open(together["out_dir"] / "samples" / f"{name}.png"))
        b = np.asarray(Image.open(alone["out_dir"] / "samples" / f"{name}.png"))
        assert a.shape == (32, 32, 3) and np.abs(a.astype(int) - b.astype(int)).max() <= 1
        assert (together["out_dir"] / "conditions" / f"{name}.png").is_file()
    manifest = json.loads((together["out_dir"] / "manifest.json").read_text())
    assert [s["seed"] for s in manifest["samples"]] == [0, 1, 2] and manifest["steps"] == 3
    # the CompVis files directly (compvis_config=) give the same images
    direct = run_sample(
        _sample_cfg(tmp_path / "c", ckpt=ckpt_path, compvis_config=config_path, masks=masks, steps=3)
    )
    assert np.array_equal(
        np.asarray(Image.open(direct["out_dir"] / "samples" / "m1.png")),
        np.asarray(Image.open(together["out_dir"] / "samples" / "m1.png")),
    )


def test_sample_refuses_bad_masks_naming_file_and_value(arch_files, tmp_path):
    config_path, ckpt_path = arch_files
    native = convert_compvis(config_path, ckpt_path, tmp_path / "native")["ckpt"]
    labels = np.zeros((32, 32), dtype=np.uint8)
    labels[3, 4] = 7
    bad = _masks(tmp_path / "bad_label", {"ok": np.zeros((32, 32)), "seven": labels})
    with pytest.raises(
        ValueError, match=re.escape(str(bad / "seven.png")) + r": label\(s\) \[7\] >= n_labels=3"
    ):
        run_sample(_sample_cfg(tmp_path, ckpt=native, masks=bad))
    odd = _masks(tmp_path / "odd", {"odd": np.zeros((30, 32))})
    with pytest.raises(
        ValueError, match=re.escape(str(odd / "odd.png")) + r": mask size 32x30 is not divisible by 16"
    ):
        run_sample(_sample_cfg(tmp_path, ckpt=native, masks=odd, resize="none"))
    with pytest.raises(ValueError, match="masks=val needs the data config"):
        run_sample(_sample_cfg(tmp_path, ckpt=ckpt_path, compvis_config=config_path, masks="val"))


def test_sample_takes_masks_of_any_size(arch_files, tmp_path):
    """A 75x50 label map: resized (nearest) and centre-cropped to the model's 32 px like the loaders,
    or kept at its own size rounded to the model's multiple of 16; labels never blend."""
    config_path, ckpt_path = arch_files
    native = convert_compvis(config_path, ckpt_path, tmp_path / "native")["ckpt"]
    labels = np.zeros((50, 75), dtype=np.uint8)
    labels[:, 40:] = 2
    masks = _masks(tmp_path / "any", {"wide": labels})
    for mode, size in (("model", (32, 32)), ("round", (48, 80))):
        out = run_sample(_sample_cfg(tmp_path / mode, ckpt=native, masks=masks, steps=2, resize=mode))
        image = np.asarray(Image.open(out["out_dir"] / "samples" / "wide.png"))
        assert image.shape[:2] == size, mode
    fitted = fit_mask(Mask("wide", labels, "wide.png"), "model", 32, 16)
    assert fitted.labels.shape == (32, 32) and set(np.unique(fitted.labels)) == {0, 2}
    assert "resized model" in fitted.source
    with pytest.raises(ValueError, match=r"resize='stretch': use one of \['model', 'round', 'none'\]"):
        fit_mask(fitted, "stretch", 32, 16)


def test_train_plan_refuses_conflicts_and_points_weights_only_resumes_to_init_from(arch_files, tmp_path):
    """segldm.train's run plan (segldm.runtime.run_plan) and init_from loading, with a converted model."""
    config_path, ckpt_path = arch_files
    native = convert_compvis(config_path, ckpt_path, tmp_path / "native")["ckpt"]
    paths = [f"paths.output_root={tmp_path}", f"paths.output_dir={tmp_path}/run"]
    plan = plan_run(compose_train(paths))  # nothing asked: nothing done
    assert plan.init_from is None and plan.ckpt_path is None
    with pytest.raises(CheckpointError, match="are both set"):
        plan_run(compose_train([*paths, f"init_from={native}", f"ckpt_path={native}"]))
    with pytest.raises(
        CheckpointError, match=re.escape(f"start a new run from its weights with init_from={native}")
    ):
        plan_run(compose_train([*paths, f"ckpt_path={native}"]))
    with pytest.raises(CheckpointError, match="needs model=ldm_seg"):
        init_from_checkpoint(torch.nn.Linear(1, 1), native)


def test_checkpoints_written_before_the_layered_package_still_load(arch_files, tmp_path):
    """A stored config naming segldm.models.ldm.LatentDiffusion (the path before docs/architecture.md's
    restructuring) is read with the class's current path, and gives the same model."""
    config_path, ckpt_path = arch_files
    native = convert_compvis(config_path, ckpt_path, tmp_path / "native")["ckpt"]
    checkpoint = torch.load(native, weights_only=True)
    assert checkpoint["segldm"]["config"]["model"]["_target_"] == "segldm.training.ldm.LatentDiffusion"
    checkpoint["segldm"]["config"]["model"]["_target_"] = "segldm.models.ldm.LatentDiffusion"
    old = save_checkpoint(checkpoint, tmp_path / "old.ckpt")
    model, reference = load_ldm(old), load_ldm(native)
    assert isinstance(model, LatentDiffusion)
    assert model.segldm_config["model"]["_target_"] == "segldm.training.ldm.LatentDiffusion"
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
