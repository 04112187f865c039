"""Every speed/memory path computes the reference's function: outputs and gradients against the
baseline mode (the CompVis way) within tolerance, bit-exact where the path is exact."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from segldm.condition import label_histograms, label_map_conditioning, one_hot_from_label_map
from segldm.data.sflckr import FlickrSegEval, FlickrSegTrain
from segldm.data.synthetic import SyntheticScenes
from segldm.models.cond_stage import SpatialRescaler
from segldm.training.latent_cache import has_fixed_samples
from segldm.training.ldm import LatentDiffusion
from segldm.training.options import FLAT_OPTION_KEYS
from segldm_bench.modes import (
    OPTIMISED,
    BatchSource,
    ModeSwitch,
    PerfMode,
    autocast,
    randomize_zero_parameters,
)
from segldm_bench.suite import write_sflckr_like
from tests.conftest import TINY_FIRST_STAGE, TINY_UNET, compose_train

N_LABELS = 12
CPU = torch.device("cpu")


# every choice the CompVis code's way at once: what each speed path must compute the same as
COMPVIS_WAY = PerfMode(
    attention="einsum",
    precision="fp32",
    first_stage_inference_mode=False,
    masks="loader_one_hot",
    fused_optimizer=False,
)


def small_ldm(**overrides: object) -> LatentDiffusion:
    """32 px images, 12 labels, a UNet with attention at two levels (so both attention paths run)."""
    cfg = compose_train(
        [
            *TINY_FIRST_STAGE,
            "data.size=32",
            f"data.n_labels={N_LABELS}",
            "model.unet.model_channels=32",
            "model.unet.channel_mult=[1,2]",
            "model.unet.num_res_blocks=1",
            "model.unet.attention_resolutions=[1,2]",
            "model.unet.num_heads=2",
            "model.first_stage.ckpt_path=null",
            "model.require_pretrained_first_stage=false",
            "paths.output_dir=/tmp/unused",
            *[f"model.{'.'.join(FLAT_OPTION_KEYS[k])}={v}" for k, v in overrides.items()],
        ]
    )
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    randomize_zero_parameters(model, std=0.05)
    return model


def batch_for(mode, batch_size: int = 2):
    return BatchSource.make(batch_size, 32, N_LABELS, seed=3).batch(mode, CPU)


def loss_and_grads(model: LatentDiffusion, batch, mode, seed: int = 7):
    torch.manual_seed(seed)
    with autocast(mode, CPU):
        loss, _ = model.shared_step(batch)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), grads


def assert_grads_close(grads, grads_ref, rtol: float = 1e-3) -> None:
    """Per tensor within rtol, with an absolute floor at 1e-5 of the largest gradient: some gradients
    are zero in exact arithmetic (the attention's key bias) and only rounding noise in practice."""
    floor = 1e-5 * max(g.abs().max().item() for g in grads_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=rtol, atol=floor)


# ---------------------------------------------------------------------------- label maps, fused
@pytest.mark.parametrize("method", ["bilinear", "area"])
def test_label_histograms_are_the_rescaled_one_hot_bit_for_bit(method):
    labels = torch.randint(0, 182, (3, 64, 96), generator=torch.Generator().manual_seed(0)).to(torch.int16)
    labels[0, :5, :9] = 255  # ignore label: an all-zero vector
    x = one_hot_from_label_map(labels, 182, 255)
    for _ in range(2):
        x = torch.nn.functional.interpolate(x, scale_factor=0.5, mode=method)
    assert torch.equal(label_histograms(labels, 182, 4, 255), x)
    stage = SpatialRescaler(2, method, 0.5, 182, 3)
    assert torch.equal(
        label_map_conditioning(stage, labels, 182, 255),
        stage.encode(one_hot_from_label_map(labels, 182, 255)),
    )


def test_label_map_conditioning_falls_back_where_it_is_not_exact():
    labels = torch.randint(0, 6, (2, 30, 30))  # 30 is not a multiple of the 4 px cell
    for stage in (SpatialRescaler(2, "bilinear", 0.5, 6, 3), SpatialRescaler(1, "nearest", 0.5, 6, 3)):
        reference = stage.encode(one_hot_from_label_map(labels, 6))
        assert torch.equal(label_map_conditioning(stage, labels, 6), reference)
    with pytest.raises(ValueError, match=r"ids \[9\]"):
        label_histograms(torch.full((1, 8, 8), 9), 6, 4)


def test_fused_conditioning_gives_the_reference_loss_and_gradients_exactly():
    model = small_ldm()
    reference = COMPVIS_WAY.replace(attention="sdpa")  # fp32, loader one-hot
    fused = reference.replace(masks="label_map")
    loss_ref, grads_ref = loss_and_grads(model, batch_for(reference), reference)
    loss, grads = loss_and_grads(model, batch_for(fused), fused)
    assert torch.equal(loss, loss_ref)
    assert all(torch.equal(g, g_ref) for g, g_ref in zip(grads, grads_ref, strict=True))


# ---------------------------------------------------------------------------- attention, layout, grad mode
def test_sdpa_and_inference_mode_and_channels_last_match_the_reference_way():
    model = small_ldm()
    switch = ModeSwitch(model)
    switch.apply(COMPVIS_WAY)
    loss_ref, grads_ref = loss_and_grads(model, batch_for(COMPVIS_WAY), COMPVIS_WAY)
    for mode in (
        COMPVIS_WAY.replace(attention="sdpa"),
        COMPVIS_WAY.replace(first_stage_inference_mode=True),
        COMPVIS_WAY.replace(channels_last=True),
        OPTIMISED.replace(precision="fp32", channels_last=True),
    ):
        switch.apply(mode)
        loss, grads = loss_and_grads(model, batch_for(mode), mode)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
        assert_grads_close(grads, grads_ref)


def test_sdpa_attention_runs_on_a_fused_kernel_forward_and_backward():
    """With a strided head dim sdpa silently falls back to the materialised math path; restricted to
    the fused kernels it would then raise "No available kernel"."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from segldm.models.autoencoder import AttnBlock
    from segldm.models.unet import AttentionBlock

    for block, x in (
        (AttentionBlock(64, num_heads=4), torch.randn(2, 64, 8, 8)),
        (AttnBlock(64), torch.randn(2, 64, 8, 8)),
    ):
        randomize_zero_parameters(block)
        x.requires_grad_(True)
        block.attention_impl = "einsum"
        reference = block(x)
        (grad_reference,) = torch.autograd.grad(reference.square().sum(), x)
        block.attention_impl = "sdpa"
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            out = block(x)
            (grad,) = torch.autograd.grad(out.square().sum(), x)
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, grad_reference, rtol=1e-4, atol=1e-4)


def test_inference_mode_latent_is_an_ordinary_tensor():
    model = small_ldm()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    h = model.encode_first_stage(x)
    assert not h.is_inference() and not h.requires_grad
    h.mul_(2.0)  # in place works outside inference mode
    model.first_stage_inference_mode = False
    assert torch.equal(model.encode_first_stage(x) * 2.0, h)


def test_channels_last_keeps_the_state_dict():
    model = small_ldm(channels_last=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.apply_performance_settings()
    assert model.model.diffusion_model.input_blocks[0][0].weight.is_contiguous(
        memory_format=torch.channels_last
    )
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    small_ldm().load_state_dict(after, strict=True)


def test_fused_adamw_steps_like_the_loop_adamw():
    model = small_ldm()
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    _, grads = loss_and_grads(model, batch_for(OPTIMISED), OPTIMISED.replace(precision="fp32"))
    after = {}
    for fused in (False, True):
        with torch.no_grad():
            for p, p0, g in zip(params, start, grads, strict=True):
                p.copy_(p0)
                p.grad = g.clone()
        optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=fused or None)
        for _ in range(3):
            optimizer.step()
        after[fused] = [p.detach().clone() for p in params]
    for fused, loop in zip(after[True], after[False], strict=True):
        torch.testing.assert_close(fused, loop, rtol=1e-6, atol=1e-6)
    assert model.optimizer_settings["fused"] is None  # the default: auto
    assert model.make_optimizer(params, 1e-3).defaults["fused"]  # auto: fused on CPU as before


# ---------------------------------------------------------------------------- bf16 autocast
def test_bf16_autocast_runs_only_the_networks_in_bf16():
    """Under CPU bf16 autocast the UNet computes in bf16, but the latent, the noise, q_sample, the
    target and the loss are float32 (diffusers' and k-diffusion's rule): mixed precision may change
    the network's arithmetic, never the diffusion process it is trained on."""
    model = small_ldm()
    seen: dict[str, torch.dtype] = {}

    def spy(name, method):
        def wrapped(*args, **kwargs):
            out = method(*args, **kwargs)
            seen.update({f"{name} arg{i}": a.dtype for i, a in enumerate(args) if torch.is_tensor(a)})
            seen[f"{name} out"] = out.dtype
            return out

        return wrapped

    model.encode_first_stage = spy("encode_first_stage", model.encode_first_stage)
    model.q_sample = spy("q_sample", model.q_sample)  # (x_start, t, noise)
    model.get_loss = spy("get_loss", model.get_loss)  # (prediction, target)
    unet_out = []
    model.model.diffusion_model.register_forward_hook(lambda m, i, o: unet_out.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model.shared_step(batch_for(OPTIMISED))
    assert unet_out == [torch.bfloat16]  # autocast is really on for the network
    assert seen == {
        "encode_first_stage arg0": torch.float32,
        "encode_first_stage out": torch.float32,  # latent (the encoder's convs ran in bf16)
        "q_sample arg0": torch.float32,  # x_start
        "q_sample arg1": torch.int64,  # t
        "q_sample arg2": torch.float32,  # noise
        "q_sample out": torch.float32,  # x_t
        "get_loss arg0": torch.float32,  # prediction, cast back at the UNet's output
        "get_loss arg1": torch.float32,  # target (the noise)
        "get_loss out": torch.float32,
    }
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("loss_type", ["l1", "l2"])
def test_bf16_training_step_is_within_bf16_tolerance_of_fp32(loss_type):
    """Tolerance: bf16 keeps 8 significant bits (unit roundoff 2^-9 = 0.2 %), and every conv and
    matmul of the UNet rounds its operands to it, forward and backward. Measured over 8 seeds on an
    Intel Xeon (AMX and with ATEN_CPU_CAPABILITY=avx2): loss within 0.14 %, L2-loss gradients within
    2.6-4.2 % (relative norm of the difference; rounding only the weights to bf16 already gives
    1.2 %). The bounds below leave 2.5x (gradients) and 7x (loss) to other CPUs' kernels.
    The L1 loss's gradient is sign(prediction - target): elements whose error is below bf16's
    rounding flip sign, so its gradient is compared through L2 only (same network, same backward).
    """
    model = small_ldm(loss_type=loss_type)
    fp32 = OPTIMISED.replace(precision="fp32")
    loss_ref, grads_ref = loss_and_grads(model, batch_for(fp32), fp32)
    loss, grads = loss_and_grads(model, batch_for(OPTIMISED), OPTIMISED)
    assert abs(loss.item() - loss_ref.item()) < 0.01 * loss_ref.item()
    assert all(g.dtype == torch.float32 for g in grads)  # weights and their gradients stay fp32
    if loss_type == "l2":
        flat, flat_ref = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in grads_ref])
        assert (flat - flat_ref).norm() < 0.1 * flat_ref.norm()


def test_bf16_autocast_keeps_the_codebook_choice_and_decodes_close_to_fp32():
    model = small_ldm()
    vq = model.first_stage_model
    h = vq.encode(torch.rand(4, 3, 32, 32) * 2 - 1).detach()
    _, _, (_, _, indices) = vq.quantize(h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, (_, _, indices_bf16) = vq.quantize(h)
        image_bf16 = model.decode_first_stage(h)
    assert torch.equal(indices, indices_bf16)
    image = model.decode_first_stage(h)
    assert (image_bf16.float() - image).abs().max() < 0.05 * image.abs().max()


# ---------------------------------------------------------------------------- cached latents
def test_cached_latents_give_the_same_steps_and_count_hits():
    model = small_ldm(cache_latents=True).train()
    batch = batch_for(OPTIMISED.replace(precision="fp32"), batch_size=3)
    torch.manual_seed(1)
    first, _ = model.shared_step(batch)
    torch.manual_seed(1)
    second, _ = model.shared_step(batch)
    model.latent_cache = None
    torch.manual_seed(1)
    uncached, _ = model.shared_step(batch)
    assert torch.equal(first, second) and torch.equal(second, uncached)


def test_latent_cache_encodes_only_what_it_has_not_seen():
    model = small_ldm(cache_latents=True).train()
    cache = model.latent_cache
    batch = batch_for(OPTIMISED, batch_size=3)
    model.get_batch_latents(batch)
    batch["index"] = torch.tensor([2, 5, 0])
    z, _ = model.get_batch_latents(batch)
    assert (len(cache), cache.hits, cache.misses) == (4, 2, 4)
    assert torch.allclose(
        z[1], model.scale_factor * model.encode_first_stage(model.get_input(batch, "image"))[1], atol=1e-5
    )
    model.eval()  # validation batches never read the cache (their indices are another split's)
    model.get_batch_latents(batch)
    assert cache.hits == 2
    model.train()
    del batch["index"]
    with pytest.raises(ValueError, match="cache_latents"):
        model.get_batch_latents(batch)


def test_only_fixed_samples_may_be_cached(tmp_path):
    write_sflckr_like(tmp_path, 2, 5)
    (tmp_path / "sflckr_eval.txt").write_text((tmp_path / "sflckr_train.txt").read_text())
    assert has_fixed_samples(SyntheticScenes(size=32, length=2))
    assert has_fixed_samples(FlickrSegEval(size=64, root=str(tmp_path), n_labels=5))  # centre crops
    assert not has_fixed_samples(FlickrSegTrain(size=64, root=str(tmp_path), n_labels=5))  # random crops
    assert not has_fixed_samples(torch.utils.data.Subset(SyntheticScenes(size=32, length=2), [0]))


# ---------------------------------------------------------------------------- through Lightning
def lightning_run(tmp_path, extra: list[str]):
    import lightning as L

    cfg = compose_train(
        [
            *TINY_FIRST_STAGE,
            *TINY_UNET,
            "data.size=32",
            "data.batch_size=2",
            "data.train.length=4",
            "data.validation.length=2",
            "trainer=cpu_fast",
            "model.first_stage.ckpt_path=null",
            "model.require_pretrained_first_stage=false",
            f"paths.output_dir={tmp_path}",
            *extra,
        ]
    )
    model = instantiate(cfg.model, scheduler=None)
    trainer = L.Trainer(
        accelerator="cpu",
        precision=cfg.trainer.precision,
        max_steps=4,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    return model, trainer, instantiate(cfg.data)


def test_cpu_fast_preset_trains_with_cached_latents_and_channels_last(tmp_path):
    model, trainer, data = lightning_run(
        tmp_path, ["model.performance.cache_latents=true", "model.performance.channels_last=true"]
    )
    assert trainer.precision == "bf16-mixed"
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 4
    assert (len(model.latent_cache), model.latent_cache.misses, model.latent_cache.hits) == (4, 4, 4)
    weight = model.model.diffusion_model.input_blocks[0][0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and weight.dtype == torch.float32


def test_cached_latents_are_refused_for_randomly_cropped_data(tmp_path):
    from segldm.data.datamodule import SegmentationDataModule

    write_sflckr_like(tmp_path / "data", 2, 8)
    model, trainer, _ = lightning_run(tmp_path, ["model.performance.cache_latents=true"])
    dataset = FlickrSegTrain(size=32, root=str(tmp_path / "data"), n_labels=8, one_hot=False)
    data = SegmentationDataModule(dataset, dataset, size=32, n_labels=8, batch_size=2)
    with pytest.raises(ValueError, match="random crops or flips"):
        trainer.fit(model, datamodule=data)


@pytest.mark.slow
def test_compiled_unet_matches_eager_and_keeps_the_keys():
    model = small_ldm(compile=True)
    keys = list(model.state_dict())
    batch = batch_for(OPTIMISED.replace(precision="fp32"))
    fp32 = OPTIMISED.replace(precision="fp32")
    loss_ref, grads_ref = loss_and_grads(model, batch, fp32)
    model.apply_performance_settings()
    loss, grads = loss_and_grads(model, batch, fp32)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-5)
    assert_grads_close(grads, grads_ref, rtol=1e-2)


@pytest.mark.slow
def test_compiled_encoder_matches_eager_and_keeps_the_keys():
    """model.performance.compile_first_stage: inductor fuses GroupNorm, SiLU and the residual adds
    and may reorder their sums, so fp32 latents agree to rounding (~1e-6 relative), not bit for bit."""
    model = small_ldm(compile_first_stage=True)
    keys = list(model.state_dict())
    images = batch_for(OPTIMISED)["image"].permute(0, 3, 1, 2).contiguous()
    eager = model.encode_first_stage(images)
    model.apply_performance_settings()
    assert model.first_stage_model.encoder._compiled_call_impl is not None
    compiled = model.encode_first_stage(images)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- samplers
def test_sde_sampler_through_the_model_is_seeded_per_image():
    model = small_ldm().eval()
    seg = one_hot_from_label_map(torch.randint(0, N_LABELS, (3, 32, 32)), N_LABELS)
    together = model.generate(seg, steps=5, eta=1.0, seeds=[5, 6, 7], sampler="dpm_solver++_sde")
    alone = model.generate(seg[1:2], steps=5, eta=1.0, seeds=[6], sampler="dpm_solver++_sde")
    assert torch.allclose(together[1:2], alone, atol=1e-5)
    other_seed = model.generate(seg[1:2], steps=5, eta=1.0, seeds=[9], sampler="dpm_solver++_sde")
    ode = model.generate(seg[1:2], steps=5, eta=1.0, seeds=[6], sampler="dpm_solver++")
    assert not torch.allclose(alone, other_seed) and not torch.allclose(alone, ode)
