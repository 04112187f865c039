"""The taming first-stage loss: each term against its closed form on tiny tensors, LPIPS offline with a
VGG16-layout file of random weights, taming's checkpoint layout, and the start-up errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hydra.utils import instantiate

from segldm.models.discriminator import NLayerDiscriminator, min_input_size, output_size
from segldm.models.first_stage_loss import (
    VQLPIPSWithDiscriminator,
    adaptive_weight,
    adopt_weight,
    hinge_d_loss,
    vanilla_d_loss,
)
from segldm.models.perceptual import LPIPS, PerceptualWeightsError, lpips_state_from
from segldm.runtime.checks import ConfigError, validate_config
from segldm.storage.checkpoint_files import CheckpointError
from segldm.training.autoencoder import load_loss_weights
from tests.conftest import TINY_FIRST_STAGE, compose_train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory) -> Path:
    """torchvision's vgg16 layout (features.N.*) with random weights: what vgg16-397923af.pth looks like."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vgg") / "vgg16-397923af.pth"
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), path)
    return path


@pytest.fixture()
def no_torchvision_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))


# ------------------------------------------------------------------------------------ GAN terms
def test_hinge_and_vanilla_discriminator_losses_are_their_closed_forms():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-3.0, 0.0, 0.25])
    # hinge: relu(1 - r) = [0, 0.5, 2] -> mean 2.5/3; relu(1 + f) = [0, 1, 1.25] -> mean 2.25/3
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 2.25 / 3))
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expected = 0.5 * (
        sum(softplus(-r) for r in real.tolist()) / 3 + sum(softplus(f) for f in fake.tolist()) / 3
    )
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)


def test_adopt_weight_switches_on_at_disc_start():
    assert adopt_weight(0.8, 9, threshold=10) == 0.0
    assert adopt_weight(0.8, 10, threshold=10) == 0.8


def test_adaptive_weight_is_the_gradient_norm_ratio_clamped_and_scaled():
    nll_grads = torch.tensor([3.0, 4.0])  # norm 5
    g_grads = torch.tensor([0.0, 2.0])  # norm 2
    assert adaptive_weight(nll_grads, g_grads, 0.75).item() == pytest.approx(0.75 * 5 / (2 + 1e-4))
    assert adaptive_weight(nll_grads, torch.zeros(2)).item() == pytest.approx(1e4)  # 5 / 1e-4 clamped
    assert adaptive_weight(torch.zeros(2), g_grads).item() == 0.0


def tiny_loss(**kwargs) -> VQLPIPSWithDiscriminator:
    torch.manual_seed(0)
    args = {"disc_start": 0, "perceptual_weight": 0.0, "disc_ndf": 8, "disc_num_layers": 2, **kwargs}
    return VQLPIPSWithDiscriminator(**args)


def test_generator_loss_adds_the_terms_with_the_adaptive_weight_at_the_last_layer():
    loss = tiny_loss(disc_weight=0.5, codebook_weight=2.0)
    torch.manual_seed(1)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    last = torch.nn.Parameter(torch.randn(3, 3, 1, 1))  # the "decoder's last layer"
    reconstruction = F.conv2d(x * 0.9, last)
    codebook = torch.tensor(0.3)
    total, logs = loss.generator_loss(codebook, x, reconstruction, global_step=5, last_layer=last)
    nll = (x - reconstruction).abs().mean()
    g = -loss.discriminator(reconstruction).mean()
    nll_grad = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g, last, retain_graph=True)[0]
    d_weight = torch.clamp(nll_grad.norm() / (g_grad.norm() + 1e-4), 0, 1e4) * 0.5
    assert logs["train/d_weight"].item() == pytest.approx(d_weight.item(), rel=1e-5)
    assert total.item() == pytest.approx((nll + d_weight * g + 2.0 * codebook).item(), rel=1e-5)
    assert logs["train/nll_loss"].item() == pytest.approx(nll.item(), rel=1e-6)
    assert logs["train/g_loss"].item() == pytest.approx(g.item(), rel=1e-6)
    before, _ = tiny_loss(disc_start=6, codebook_weight=2.0).generator_loss(
        codebook, x, reconstruction, 5, last
    )
    assert before.item() == pytest.approx((nll + 2 * 0.3).item(), rel=1e-6)  # disc_factor 0 before disc_start
    _, val_logs = loss.generator_loss(codebook, x, reconstruction.detach(), 5, None, split="val")
    assert val_logs["val/d_weight"].item() == 0.0  # no gradients outside training: taming's fallback


@pytest.mark.parametrize("kind", ["hinge", "vanilla"])
def test_discriminator_loss_is_disc_factor_times_the_gan_loss_on_detached_images(kind):
    loss = tiny_loss(disc_loss=kind, disc_factor=0.7)
    x, fake = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16, requires_grad=True)
    d_loss, logs = loss.discriminator_loss(x, fake, global_step=0)
    real_logits, fake_logits = loss.discriminator(x), loss.discriminator(fake.detach())
    formula = hinge_d_loss if kind == "hinge" else vanilla_d_loss
    assert d_loss.item() == pytest.approx(0.7 * formula(real_logits, fake_logits).item(), rel=1e-6)
    assert logs["train/logits_real"].item() == pytest.approx(real_logits.mean().item(), rel=1e-6)
    d_loss.backward()
    assert fake.grad is None  # the generator gets nothing from the discriminator's step


def test_patchgan_logit_map_size_and_the_smallest_image_it_fits():
    for layers in (1, 2, 3):
        d = NLayerDiscriminator(ndf=4, n_layers=layers).eval()
        for size in (24, 32, 64):
            assert d(torch.zeros(1, 3, size, size)).shape[-1] == output_size(size, layers)
        assert output_size(min_input_size(layers), layers) == 1
        assert output_size(min_input_size(layers) - 1, layers) < 1
    assert min_input_size(3) == 24  # taming's default depth


# ------------------------------------------------------------------------------------ LPIPS
def taming_lpips(model: LPIPS, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """taming.modules.losses.lpips.LPIPS.forward written out."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    feats = []
    for image in (x, y):
        h, outs = (image - shift) / scale, []
        for block in (
            model.net.slice1,
            model.net.slice2,
            model.net.slice3,
            model.net.slice4,
            model.net.slice5,
        ):
            h = block(h)
            outs.append(h / (torch.sqrt((h**2).sum(1, keepdim=True)) + 1e-10))
        feats.append(outs)
    heads = (model.lin0, model.lin1, model.lin2, model.lin3, model.lin4)
    return sum(
        F.conv2d((a - b) ** 2, head.model[1].weight).mean([2, 3], keepdim=True)
        for a, b, head in zip(*feats, heads, strict=True)
    )


def test_lpips_from_a_torchvision_vgg16_file_is_tamings_formula_and_the_lpips_package(vgg16_file):
    import lpips

    model = LPIPS(vgg16_path=vgg16_file)
    features = torchvision.models.vgg16(weights=None).features
    features.load_state_dict(
        {
            k.removeprefix("features."): v
            for k, v in torch.load(vgg16_file).items()
            if k.startswith("features.")
        }
    )
    assert torch.equal(model.net.slice3[10 - 9].weight, features[10].weight)  # features.10 -> slice3
    torch.manual_seed(2)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    ours = model(x, y)
    assert ours.shape == (2, 1, 1, 1) and (ours > 0).all()
    torch.testing.assert_close(ours, taming_lpips(model, x, y), rtol=1e-5, atol=1e-7)
    package = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    package.load_state_dict(model.state_dict(), strict=False)
    torch.testing.assert_close(ours, package(x, y), rtol=1e-5, atol=1e-7)
    assert model(x, x).abs().max() == 0
    assert not any(p.requires_grad for p in model.parameters())
    # taming's quirk: its LPIPS follows the training module's mode, so the heads' dropout is on in training
    torch.manual_seed(3)
    assert not torch.allclose(model.train()(x, y), ours)
    assert torch.equal(LPIPS(vgg16_path=vgg16_file, dropout_in_training=False).train()(x, y), ours)


def test_missing_vgg16_weights_name_both_ways_to_provide_them(no_torchvision_cache, tmp_path):
    with pytest.raises(PerceptualWeightsError) as err:
        LPIPS()
    message = str(err.value)
    assert "model.loss.vgg16_path=<file>" in message and "vgg16-397923af.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message and "perceptual_weight=0" in message
    with pytest.raises(PerceptualWeightsError, match=r"vgg16_path=.*nowhere.pth: no such file"):
        LPIPS(vgg16_path=tmp_path / "nowhere.pth")
    assert tiny_loss(perceptual_weight=0.0).perceptual_loss is None  # offline without any file


def test_torchvision_cache_is_used_when_present(no_torchvision_cache, tmp_path, vgg16_file):
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / vgg16_file.name).symlink_to(vgg16_file)
    assert LPIPS().backbone_source == str(cache / vgg16_file.name)


def taming_checkpoint(path: Path, loss: VQLPIPSWithDiscriminator, vq_state: dict | None = None) -> Path:
    """A taming/CompVis VQ checkpoint: VQ keys without prefix, the loss under loss.*."""
    state = {**(vq_state or {}), **{f"loss.{k}": v for k, v in loss.state_dict().items()}}
    torch.save({"state_dict": state}, path)
    return path


def test_a_taming_checkpoint_provides_lpips_and_discriminator_strictly(
    tmp_path, vgg16_file, no_torchvision_cache
):
    source = tiny_loss(perceptual_weight=1.0, vgg16_path=vgg16_file, disc_ndf=8)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01)
    ckpt = taming_checkpoint(tmp_path / "taming.ckpt", source)
    assert set(lpips_state_from(torch.load(ckpt), "x")[0]) >= {"net.slice1.0.weight", "lin0.model.1.weight"}
    # no VGG file anywhere: the checkpoint's own loss.perceptual_loss.* is the backbone and heads
    target = tiny_loss(perceptual_weight=1.0, lpips_checkpoint=ckpt, disc_ndf=8)
    load_loss_weights(target, str(ckpt))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    offline = tiny_loss(perceptual_weight=0.0, disc_ndf=8)  # LPIPS keys not needed: skipped
    load_loss_weights(offline, str(ckpt))
    assert torch.equal(offline.discriminator.main[0].weight, source.discriminator.main[0].weight)
    with pytest.raises(
        CheckpointError,
        match=r"taming.ckpt: its loss.\* keys do not fit .*main.0.bias: checkpoint \(8,\) vs config \(4,\)",
    ):
        load_loss_weights(tiny_loss(perceptual_weight=0.0, disc_ndf=4), str(ckpt))


# ------------------------------------------------------------------------------------ start-up checks
def autoencoder_cfg(tmp_path, *overrides: str):
    return compose_train(
        [
            "model=autoencoder",
            "model/loss=taming",
            *TINY_FIRST_STAGE,
            "data.size=32",
            f"paths.output_root={tmp_path}",
            f"paths.output_dir={tmp_path}",
            *overrides,
        ]
    )


def test_start_up_errors_name_the_key_and_the_way_out(tmp_path, no_torchvision_cache):
    with pytest.raises(ConfigError) as err:
        validate_config(autoencoder_cfg(tmp_path))
    assert "model.loss.vgg16_path=<file>" in str(err.value)
    with pytest.raises(
        ConfigError,
        match=r"disc_num_layers=3: the PatchGAN needs images of at least 24 px but data.size=16; use model.loss.disc_num_layers=2",
    ):
        validate_config(autoencoder_cfg(tmp_path, "data.size=16", "model.loss.perceptual_weight=0"))
    validate_config(autoencoder_cfg(tmp_path, "model.loss.perceptual_weight=0"))


def test_taming_config_instantiates_the_training_module_with_two_optimizers(tmp_path, vgg16_file):
    cfg = autoencoder_cfg(tmp_path, f"model.loss.vgg16_path={vgg16_file}")
    validate_config(cfg)
    module = instantiate(cfg.model)
    assert not module.automatic_optimization
    keys = set(module.state_dict())
    assert "loss.perceptual_loss.net.slice1.0.weight" in keys and "loss.discriminator.main.0.weight" in keys
    assert "loss.perceptual_loss.lin0.model.1.weight" in keys and "vq.decoder.conv_out.weight" in keys


def test_quickstart_first_stage_trains_with_the_gan_and_lpips_only_when_weights_exist(
    tmp_path, no_torchvision_cache, vgg16_file
):
    cfg = compose_train(
        ["experiment=quickstart_autoencoder", "model/loss=taming_quickstart", f"paths.output_root={tmp_path}"]
    )
    validate_config(cfg)  # no VGG16 anywhere: still valid (perceptual_required: false)
    assert cfg.model.loss.disc_start == cfg.trainer.max_steps // 2
    with pytest.warns(UserWarning, match="training without the perceptual term"):
        loss = instantiate(cfg.model.loss)
    assert loss.perceptual_loss is None and loss.perceptual_weight == 0.0
    cfg.model.loss.vgg16_path = str(vgg16_file)
    assert instantiate(cfg.model.loss).perceptual_loss is not None


def test_the_quickstart_first_stage_trains_without_the_gan_by_default(tmp_path):
    cfg = compose_train(["experiment=quickstart_autoencoder", f"paths.output_root={tmp_path}"])
    validate_config(cfg)
    module = instantiate(cfg.model)
    assert module.loss is None and module.automatic_optimization and module.l2_weight == 1.0
    assert list(cfg.model.first_stage.ddconfig.ch_mult) == [1, 1, 2]
    # the LDM loads what stage 1 trains
    ldm = compose_train(["experiment=quickstart", f"paths.output_root={tmp_path}"])
    assert ldm.model.first_stage.ddconfig == cfg.model.first_stage.ddconfig


def test_a_vq_checkpoint_with_another_codebook_size_is_refused_naming_file_and_key(tmp_path):
    from segldm.models.autoencoder import VQModel, load_first_stage_weights

    ddconfig = {"double_z": False, "z_channels": 3, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}  # fmt: skip
    path = tmp_path / "vq.ckpt"
    torch.save({"state_dict": VQModel(ddconfig, n_embed=32, embed_dim=3).state_dict()}, path)
    with pytest.raises(CheckpointError) as err:
        load_first_stage_weights(VQModel(ddconfig, n_embed=64, embed_dim=3), path)
    message = str(err.value)
    assert (
        str(path) in message
        and "its codebook has 32 codes" in message
        and "model.first_stage.n_embed" in message
    )
    assert "quantize.embedding.weight: checkpoint (32, 3) vs model (64, 3)" in message
