"""LatentDiffusion wiring: shapes, the full fixture model through the LDM API, NaN guard, EMA scope."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import Dataset

from segldm.data.datamodule import SegmentationDataModule
from segldm.data.synthetic import SyntheticScenes
from segldm.diffusion.samplers import SamplerSettings
from segldm.models.autoencoder import VQModel
from segldm.models.cond_stage import SpatialRescaler
from segldm.models.unet import UNetModel
from segldm.training.ldm import LatentDiffusion
from segldm.training.options import group_flat_options
from tests.compvis_fixtures import assert_close_rel, load_config, load_io, load_state_dict, model_fixture_dirs
from tests.conftest import TINY_DATA, TINY_FIRST_STAGE, TINY_UNET, compose_train


def tiny_ldm(**kwargs) -> LatentDiffusion:
    cfg = compose_train(
        [
            *TINY_DATA,
            *TINY_FIRST_STAGE,
            *TINY_UNET,
            "model.first_stage.ckpt_path=null",
            "model.require_pretrained_first_stage=false",
            "paths.output_dir=/tmp/unused",
        ]
    )
    return instantiate(cfg.model, **group_flat_options(kwargs))  # flat names, e.g. cond_drop_prob=0.5


def test_shapes_through_the_compvis_named_api():
    model = tiny_ldm()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    seg = torch.nn.functional.one_hot(torch.randint(0, 8, (2, 32, 32)), 8).permute(0, 3, 1, 2).float()
    z = model.get_first_stage_encoding(model.encode_first_stage(x))
    c = model.get_learned_conditioning(seg)
    assert z.shape == (2, 3, 8, 8) and c.shape == (2, 3, 8, 8)
    t = torch.tensor([0, 999])
    assert model.apply_model(model.q_sample(z, t), t, c).shape == z.shape
    assert model.decode_first_stage(z).shape == x.shape
    images = model.generate(seg, steps=4, eta=0.0, seeds=[0, 1])
    assert images.shape == x.shape and images.abs().max() <= 1
    fast = model.generate(seg, steps=4, seeds=[0, 1], sampler="dpm_solver++")
    assert fast.shape == x.shape and torch.isfinite(fast).all()
    with pytest.raises(ValueError, match="'plms'"):
        model.generate(seg, steps=4, sampler="plms")


def test_model_sampler_is_a_typed_group_refusing_unknown_keys():
    assert tiny_ldm(sampler={"steps": 4}).sampler_settings == SamplerSettings(
        steps=4, options={"spacing": "logsnr", "ddim_discretization": "uniform"}
    )
    with pytest.raises(
        InstantiationException, match=r"model.sampler.ddim_discretisation='trailing' is not an option"
    ):
        tiny_ldm(sampler={"ddim_discretisation": "trailing"})


def test_requires_a_pretrained_first_stage_by_default():
    with pytest.raises(InstantiationException, match="model=autoencoder"):
        tiny_ldm(require_pretrained_first_stage=True)


def test_first_stage_is_frozen_and_stays_in_eval_mode():
    model = tiny_ldm()
    model.train()
    assert not model.first_stage_model.training
    assert not any(p.requires_grad for p in model.first_stage_model.parameters())
    assert all(p.requires_grad for p in model.cond_stage_model.parameters())


def test_ema_scope_swaps_and_restores():
    model = tiny_ldm()
    param = next(p for p in model.model.parameters())
    original = param.detach().clone()
    with torch.no_grad():
        param.add_(1.0)
    with model.ema_scope():
        assert torch.equal(param, original)  # shadow still holds the initial weights
    assert torch.equal(param, original + 1.0)


def test_generation_does_not_depend_on_batch_composition():
    model = tiny_ldm().eval()
    seg = torch.nn.functional.one_hot(torch.randint(0, 8, (3, 32, 32)), 8).permute(0, 3, 1, 2).float()
    together = model.generate(seg, steps=4, eta=1.0, seeds=[5, 6, 7])
    alone = model.generate(seg[1:2], steps=4, eta=1.0, seeds=[6])
    assert torch.allclose(together[1:2], alone, atol=1e-5)


@pytest.mark.parametrize("folder", model_fixture_dirs(), ids=lambda p: p.name)
def test_reference_model_through_latent_diffusion(folder):
    """The whole CompVis state_dict loads strictly into LatentDiffusion and reproduces the seeded train step."""
    params = load_config(folder)["model"]["params"]
    io = load_io(folder)
    model = LatentDiffusion(
        UNetModel(**params["unet_config"]["params"]),
        VQModel(**{k: v for k, v in params["first_stage_config"]["params"].items() if k != "lossconfig"}),
        SpatialRescaler(**params["cond_stage_config"]["params"]),
        diffusion={
            "timesteps": params["timesteps"],
            "linear_start": params["linear_start"],
            "linear_end": params["linear_end"],
            "loss_type": params["loss_type"],
        },
        image_size=params["image_size"],
        channels=params["channels"],
        use_ema=params.get("use_ema", True),
        scale_factor=params.get("scale_factor", 1.0),
        require_pretrained_first_stage=False,
    )
    missing, unexpected = model.load_state_dict(load_state_dict(folder), strict=True)
    assert not missing and not unexpected
    model.train()
    batch = {"image": io["batch_image"], "segmentation": io["batch_segmentation"].float()}
    torch.manual_seed(int(io["train_step_seed"]))
    loss, _ = model.shared_step(batch)
    assert_close_rel(loss, io["train_step_loss"], name="train_step_loss")
    model.eval()
    with torch.no_grad():
        samples, inter = model.sample(
            io["cond"],
            steps=len(io["ddim/timesteps"]),
            eta=0.0,
            x_T=io["ddim/x_T"],
            return_intermediates=True,
        )
    assert_close_rel(samples, io["ddim/samples"], rel=1e-3, name="ddim/samples")
    assert_close_rel(torch.stack(inter["pred_x0"]), io["ddim/pred_x0"], rel=1e-3, name="ddim/pred_x0")
    assert_close_rel(model.decode_first_stage(io["ddim/samples"]), io["ddim/decoded"], name="ddim/decoded")
    model.colorize = io["to_rgb/colorize"]
    assert_close_rel(model.to_rgb(io["batch_segmentation"].float().permute(0, 3, 1, 2)), io["to_rgb/out"])


class _NaNAfter(Dataset):
    """Synthetic scenes whose images turn to NaN from index `bad` on (shuffle off)."""

    def __init__(self, bad: int) -> None:
        self.inner, self.bad, self.n_labels = SyntheticScenes(32, 16), bad, 8

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        item = self.inner[i]
        if i >= self.bad:
            item["image"] = torch.full_like(item["image"], float("nan"))
        return item


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    model = tiny_ldm(base_learning_rate=1e-4)
    data = SegmentationDataModule(
        _NaNAfter(bad=6), SyntheticScenes(32, 2), size=32, n_labels=8, batch_size=2, shuffle=False
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1, save_top_k=-1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=10,
        logger=False,
        callbacks=[ckpt],
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(FloatingPointError, match="global step 3, batch 3"):
        trainer.fit(model, datamodule=data)
    last = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
