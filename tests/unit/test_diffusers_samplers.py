"""``diffusers:<SchedulerClass>`` samplers: each is diffusers' own scheduler loop on the same model and
noise, keeps per-sample seeds, and plugs into segldm's generation like the built-in samplers.

The reference is the loop a diffusers user writes (``set_timesteps``; for each t: ``scale_model_input``,
model, ``step(..., generator=...)``) on a scheduler configured by hand with the model's schedule and
CompVis's conventions (scaled_linear, steps_offset=1, set_alpha_to_one=False, leading timesteps).
The model is analytic: the ideal noise predictor for Gaussian data, eps = sqrt(1 - a_t) x /
(a_t s^2 + 1 - a_t), which depends on the integer timestep it is given. End to end, a tiny random LDM
samples through ``segldm.pipeline.generation.generate`` and through its exported diffusers pipeline
with the same scheduler swapped in.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

from segldm.diffusion import diffusers_samplers
from segldm.diffusion.samplers import make_sampler, sampler_name_problem
from segldm.diffusion.schedule import make_beta_schedule, schedule_buffers

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers not installed: pip install 'segldm[diffusers]'"
)

REPO = Path(__file__).resolve().parents[2]
START, END, T = 0.0015, 0.0205, 1000  # the seed's schedule
SCHEDULE = {"timesteps": T, "beta_schedule": "linear", "linear_start": START, "linear_end": END}
AC = schedule_buffers(make_beta_schedule("linear", T, START, END))["alphas_cumprod"]
DATA_STD = 0.5
STEPS = 10
TOL = 1e-6  # adapter vs the hand-written loop: the same operations (measured: 0 for every scheduler)
# the samplers issue 25 names, the stochastic ones marked; DDIM with eta 1 as a stochastic cross-check
SPECS = {
    "diffusers:UniPCMultistepScheduler": False,
    "diffusers:DEISMultistepScheduler": False,
    "diffusers:DPMSolverMultistepScheduler": False,
    "diffusers:DPMSolverMultistepScheduler(algorithm_type=sde-dpmsolver++,use_karras_sigmas=true)": True,
    "diffusers:EulerAncestralDiscreteScheduler": True,
    "diffusers:PNDMScheduler": False,
    "diffusers:HeunDiscreteScheduler": False,
    "diffusers:DDIMScheduler": True,
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ideal_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact noise predictor for data ~ N(0, DATA_STD^2) under the model's schedule."""
    a = AC[t.long()].view(-1, *[1] * (x.ndim - 1)) if t.ndim else AC[t.long()]
    return (1 - a).sqrt() * x / (a * DATA_STD**2 + 1 - a)


def gens(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def noise(seeds: list[int]) -> torch.Tensor:
    return torch.stack([torch.randn(2, 4, 4, generator=g) for g in gens([100 + s for s in seeds])])


def reference_loop(
    spec: str, x_T: torch.Tensor, generators: list[torch.Generator], eta: float
) -> torch.Tensor:
    """What a diffusers user writes, on a scheduler configured by hand."""
    name, options = diffusers_samplers.parse_sampler_name(spec)
    config = {
        "num_train_timesteps": T,
        "beta_start": START,
        "beta_end": END,
        "beta_schedule": "scaled_linear",  # CompVis "linear": linear in sqrt(beta)
        "steps_offset": 1,
        "set_alpha_to_one": False,
        "clip_sample": False,
        "timestep_spacing": "leading",
        "prediction_type": "epsilon",
    }
    scheduler = getattr(diffusers, name).from_config({**config, **options})
    scheduler.set_timesteps(STEPS)
    x = x_T * scheduler.init_noise_sigma
    extra = {"eta": eta} if name == "DDIMScheduler" else {}
    if SPECS[spec]:  # the stochastic ones: one generator per sample
        extra["generator"] = generators
    for t in scheduler.timesteps:
        eps = ideal_eps(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(eps, t, x, **extra).prev_sample
    return x


@pytest.mark.parametrize("spec", list(SPECS))
def test_each_adapter_is_diffusers_own_loop_and_keeps_per_sample_seeds(spec: str) -> None:
    sampler = make_sampler(spec, STEPS, 1.0, schedule=SCHEDULE)
    sampler.check(T, "eval.steps")
    both, _ = sampler.sample(ideal_eps, noise([0, 1]), AC, gens([0, 1]))
    want = reference_loop(spec, noise([0, 1]), gens([0, 1]), eta=1.0)
    assert (both - want).abs().max() <= TOL
    assert torch.isfinite(both).all() and both.abs().max() < 10
    for i in (0, 1):  # each sample alone: the same image as in the batch
        alone, _ = sampler.sample(ideal_eps, noise([i]), AC, gens([i]))
        assert (alone[0] - both[i]).abs().max() <= TOL
    if SPECS[spec]:  # stochastic: the noise is the generators'
        other, _ = sampler.sample(ideal_eps, noise([0, 1]), AC, gens([7, 8]))
        assert (other - both).abs().max() > 1e-3


def test_diffusers_ddim_is_segldm_ddim() -> None:
    """The same algorithm in both code bases, noise drawn per step from the per-sample generators."""
    for eta in (0.0, 1.0):
        ours, _ = make_sampler("ddim", 20, eta).sample(ideal_eps, noise([0, 1]), AC, gens([0, 1]))
        theirs, _ = make_sampler("diffusers:DDIMScheduler", 20, eta, schedule=SCHEDULE).sample(
            ideal_eps, noise([0, 1]), AC, gens([0, 1])
        )
        assert (ours - theirs).abs().max() <= 2e-5 * ours.abs().max()  # measured: 6e-7 relative


def test_the_scheduler_has_the_models_schedule() -> None:
    named = make_sampler("diffusers:UniPCMultistepScheduler", STEPS, 0.0, schedule=SCHEDULE)
    scheduler = named.make_scheduler(AC)
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.steps_offset == 1
    assert scheduler.config.prediction_type == "epsilon"  # model_fn returns eps for eps, v and x0 models
    # without the model's settings: trained_betas from its alphas_cumprod, the same samples to rounding
    from_buffers = make_sampler("diffusers:UniPCMultistepScheduler", STEPS, 0.0)
    assert from_buffers.make_scheduler(AC).config.trained_betas is not None
    a, _ = named.sample(ideal_eps, noise([0]), AC)
    b, _ = from_buffers.sample(ideal_eps, noise([0]), AC)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    wrong = make_sampler(
        "diffusers:UniPCMultistepScheduler", STEPS, 0.0, schedule={**SCHEDULE, "linear_end": 0.012}
    )
    with pytest.raises(ValueError, match="alphas_cumprod differs from the model's"):
        wrong.sample(ideal_eps, noise([0]), AC)


def test_options_are_typed_and_unknown_ones_named() -> None:
    sampler = make_sampler(
        "diffusers:DPMSolverMultistepScheduler( solver_order = 3, lambda_min_clipped=-5, final_sigmas_type=sigma_min)",
        STEPS,
        0.0,
    )
    scheduler = sampler.make_scheduler(AC)
    assert scheduler.config.solver_order == 3 and scheduler.config.lambda_min_clipped == -5.0
    assert sampler.spec == (
        "diffusers:DPMSolverMultistepScheduler(solver_order=3,lambda_min_clipped=-5,final_sigmas_type=sigma_min)"
    )
    # the same options as a mapping (the Python API)
    mapped = make_sampler("diffusers:DPMSolverMultistepScheduler", STEPS, 0.0, options={"solver_order": 3})
    assert mapped.make_scheduler(AC).config.solver_order == 3
    problems = {
        "diffusers:UniPCMultistepScheduler(solver_ordr=3)": r"has no option 'solver_ordr'; its options are \[.*'solver_order'",
        "diffusers:UniPCMultistepScheduler(solver_order=two)": "solver_order=two must be int",
        "diffusers:UniPCMultistepScheduler(use_karras_sigmas=1)": "use_karras_sigmas=1 must be bool",
        "diffusers:UniPCMultistepScheduler(beta_end=0.012)": "beta_end is the model's training schedule",
        "diffusers:UniPCMultistepScheduler(prediction_type=v_prediction)": "prediction_type is the model's",
        "diffusers:UniPCMultistepScheduler(use_flow_sigmas=true)": "flow-matching",
        "diffusers:UniPCMultistepScheduler(solver_order)": "is not key=value",
        "diffusers:UniPCMultistepScheduler(solver_order=2, solver_order=3)": "given twice",
        "diffusers:DPMSolverMultistepScheduler(algorithm_type=dpmsolver+++)": "diffusers refused the options",
    }
    for spec, message in problems.items():
        with pytest.raises(ValueError, match=message):
            make_sampler(spec, STEPS, 0.0).check(T, "eval.steps")
    assert "solver_ordr" in sampler_name_problem("diffusers:UniPCMultistepScheduler(solver_ordr=3)")
    assert sampler_name_problem("diffusers:UniPCMultistepScheduler(solver_order=3)") is None
    assert sampler_name_problem("ddim") is None
    assert "is not a sampler" in sampler_name_problem("euler")


def test_unknown_and_unsupported_classes_name_the_available_ones() -> None:
    with pytest.raises(
        ValueError,
        match=r"NoSuchScheduler is not a diffusers scheduler .* use one of \[.*"
        r"'diffusers:UniPCMultistepScheduler'",
    ):
        make_sampler("diffusers:NoSuchScheduler", STEPS, 0.0).check(T, "eval.steps")
    assert "not from the per-sample generators" in sampler_name_problem("diffusers:DPMSolverSDEScheduler")
    assert "EDM sigma schedule" in sampler_name_problem("diffusers:EDMEulerScheduler")
    assert "is not a diffusers scheduler" in sampler_name_problem("diffusers:FlowMatchEulerDiscreteScheduler")
    supported = diffusers_samplers.supported_schedulers()
    assert {"UniPCMultistepScheduler", "DEISMultistepScheduler", "PNDMScheduler"} <= set(supported)
    with pytest.raises(ValueError, match="between integer timesteps.*use_karras_sigmas"):
        make_sampler("diffusers:EulerDiscreteScheduler(use_karras_sigmas=true)", STEPS, 0.0).check(
            T, "eval.steps"
        )
    with pytest.raises(ValueError, match="eval.steps=1001: more steps than"):
        make_sampler("diffusers:UniPCMultistepScheduler", 1001, 0.0).check(T, "eval.steps")
    # CompVis's +1 shift overruns T - 1 where diffusers lets it; leading spacing degenerates
    with pytest.raises(ValueError, match=r"eval.steps=1000: .* visits t=1000 .*timestep_spacing=trailing"):
        make_sampler("diffusers:DDPMScheduler", 1000, 0.0).check(T, "eval.steps")
    with pytest.raises(ValueError, match="eval.steps=1000: .* do not descend"):
        make_sampler("diffusers:UniPCMultistepScheduler", 1000, 0.0).check(T, "eval.steps")
    make_sampler("diffusers:DDPMScheduler(timestep_spacing=trailing)", 1000, 0.0).check(T, "eval.steps")
    zero_terminal = AC.clone()
    zero_terminal[-1] = 0
    with pytest.raises(ValueError, match="zero terminal SNR"):
        make_sampler("diffusers:UniPCMultistepScheduler", STEPS, 0.0).sample(
            ideal_eps, noise([0]), zero_terminal
        )


def test_without_diffusers_the_sampler_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ModuleNotFoundError
    sampler = make_sampler("diffusers:UniPCMultistepScheduler", STEPS, 0.0)  # naming it needs no diffusers
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'segldm\[diffusers\]'"):
        sampler.check(T, "eval.steps")
    assert "pip install 'segldm[diffusers]'" in sampler_name_problem("diffusers:UniPCMultistepScheduler")


def test_segldm_diffusion_imports_diffusers_only_inside_functions() -> None:
    for path in (REPO / "segldm" / "diffusion").glob("*.py"):
        top_level = ast.parse(path.read_text()).body
        imported = [
            alias.name
            for node in top_level
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
        ]
        assert not any(name.split(".")[0] == "diffusers" for name in imported), path


# ---------------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_ldm(tmp_path_factory) -> dict:
    """A random tiny LDM (condition dropout on, for guidance) and its exported diffusers pipeline."""
    from omegaconf import OmegaConf

    from segldm.compat.diffusers import export_diffusers, load_pipeline
    from segldm.runtime.loading import build_ldm, ldm_checkpoint
    from segldm.storage.checkpoint_files import save_checkpoint
    from tests.conftest import TINY_DATA, TINY_FIRST_STAGE, TINY_UNET, compose_train
    from tests.unit.test_compat_compvis import randomize

    folder = tmp_path_factory.mktemp("diffusers_samplers")
    cfg = compose_train([*TINY_DATA, *TINY_FIRST_STAGE, *TINY_UNET, "model.diffusion.cond_drop_prob=0.1"])
    config = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
    }
    model = build_ldm(config["model"])
    randomize(model, 0)
    ckpt = save_checkpoint(ldm_checkpoint(model.state_dict(), config, global_step=1), folder / "ldm.ckpt")
    export_diffusers(ckpt, folder / "pipeline", use_ema=False)
    return {
        "model": model.eval(),
        "pipe": load_pipeline(folder / "pipeline"),
        "n_labels": cfg.data.n_labels,
        "folder": folder,
    }


def test_start_up_checks_read_the_sampler_name(tiny_ldm) -> None:
    from segldm.runtime.checks import validate_config
    from tests.conftest import TINY_DATA, TINY_FIRST_STAGE, TINY_UNET, compose_train

    def config(name: str):
        first_stage = f"model.first_stage.ckpt_path={tiny_ldm['folder'] / 'pipeline' / 'vqvae'}"
        return compose_train(
            [*TINY_DATA, *TINY_FIRST_STAGE, *TINY_UNET, first_stage, f"model.sampler.name='{name}'"]
        )

    validate_config(config("diffusers:UniPCMultistepScheduler(solver_order=3)"))
    with pytest.raises(
        ValueError,
        match=r"model.sampler.name='diffusers:UniPCMultistepScheduler\(solver_ordr=3\)' "
        r".*has no option 'solver_ordr'",
    ):
        validate_config(config("diffusers:UniPCMultistepScheduler(solver_ordr=3)"))
    with pytest.raises(ValueError, match="model.sampler.name='euler' is not a sampler"):
        validate_config(config("euler"))


@pytest.mark.parametrize(
    ("spec", "guidance"),
    [
        ("diffusers:UniPCMultistepScheduler", 1.0),
        ("diffusers:DPMSolverMultistepScheduler(algorithm_type=sde-dpmsolver++,use_karras_sigmas=true)", 2.0),
    ],
)
def test_generate_with_a_diffusers_sampler_is_the_exported_pipeline_with_that_scheduler(
    tiny_ldm, spec, guidance
):
    from segldm.pipeline.generation import SamplingSettings, generate

    model, pipe = tiny_ldm["model"], tiny_ldm["pipe"]
    masks = [torch.randint(0, int(tiny_ldm["n_labels"]), (32, 32), generator=g) for g in gens([11, 12])]
    seeds = [3, 4]
    settings = SamplingSettings(
        sampler=spec, steps=STEPS, eta=0.0, use_ema=False, batch_size=2, guidance_scale=guidance
    )
    model.check_sampler_settings(STEPS, spec, "eval.steps", guidance)
    got = generate(model, masks, seeds, settings, progress=None)
    assert got.unet_evaluations == STEPS * 2 * (2 if guidance != 1.0 else 1)
    alone = generate(
        model, masks[1:], seeds[1:], SamplingSettings(**{**settings.__dict__, "batch_size": 1}), progress=None
    )
    assert (alone.images[0] - got.images[1]).abs().max() <= 1e-5  # per-sample seeds: batch-independent

    name, options = diffusers_samplers.parse_sampler_name(spec)
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **options)

    def run_pipe(output_type: str) -> torch.Tensor:
        masks_batch, generators = torch.stack(masks), gens(seeds)
        return pipe(
            masks_batch, STEPS, guidance_scale=guidance, generator=generators, output_type=output_type
        ).images

    # latents: the same to rounding (measured 1.7e-7 and 3.2e-7 relative)
    cond = model.get_learned_conditioning(torch.stack(masks))
    latents = model.sample(
        cond, STEPS, 0.0, generators=gens(seeds), use_ema=False, sampler=spec, guidance_scale=guidance
    )
    assert (latents - run_pipe("latent")).abs().max() <= 1e-5 * latents.abs().max()
    # images (measured 2.4e-7): the decoder's quantization could flip a code on a tie (docs/diffusers.md)
    ours = (torch.stack(got.images) + 1) / 2  # segldm's images are in [-1, 1], the pipeline's in [0, 1]
    assert (ours - run_pipe("pt")).abs().max() <= 1e-4


def test_segldm_sample_takes_a_diffusers_sampler_with_options(tiny_ldm, tmp_path) -> None:
    """``segldm.sample sampler='diffusers:...(...)'`` (Hydra needs the quotes for the parentheses)."""
    import json

    import numpy as np
    from hydra import compose, initialize_config_dir
    from PIL import Image

    from segldm.sample import sample
    from tests.conftest import CONF

    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(2):
        labels = np.random.default_rng(i).integers(0, int(tiny_ldm["n_labels"]), (32, 32)).astype(np.uint8)
        Image.fromarray(labels, mode="L").save(masks / f"m{i}.png")
    spec = "diffusers:DPMSolverMultistepScheduler(algorithm_type=sde-dpmsolver++,use_karras_sigmas=true)"
    overrides = [
        f"ckpt={tiny_ldm['folder'] / 'ldm.ckpt'}",
        f"masks={masks}",
        f"out_dir={tmp_path / 'out'}",
        f"sampler='{spec}'",
        f"steps={STEPS}",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="sample", overrides=overrides)
    result = sample(cfg)
    manifest = json.loads((result["out_dir"] / "manifest.json").read_text())
    assert manifest["sampler"] == spec and result["count"] == 2
    assert (result["out_dir"] / "samples" / "m1.png").is_file()
