"""The seed guide's own inference script (../shared/seeds/, "Inference") runs on segldm as written,
with only its two loading lines changed (CompVis's load_model -> segldm's load_compvis, and
ldm.data.flickr -> segldm.data.sflckr) and 'cuda' -> 'cpu': CompVis's `model.sample_log` /
`DDIMSampler` API, `to_rgb`, `get_learned_conditioning`, `decode_first_stage`."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segldm.compat.compvis import DDIMSampler
from tests.compvis_fixtures import fixtures_dir
from tests.conftest import REPO
from tests.unit.test_compat_compvis import ARCH_EMA, compvis_config, direct_model, randomize, write_arch

SEEDS = REPO.parent / "shared" / "seeds"
FILES = fixtures_dir() / "data" / "files"

# 182 labels at 256 px as the seed; a small UNet and first stage so CPU sampling takes seconds
ARCH_SEED_SHAPE = compvis_config(
    unet={
        "model_channels": 32,
        "attention_resolutions": [4],
        "num_res_blocks": 1,
        "channel_mult": [1, 1, 2],
        "num_heads": 2,
    },
    ddconfig={
        "double_z": False,
        "z_channels": 3,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 32,
        "ch_mult": [1, 1, 1],
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "dropout": 0.0,
    },
    n_embed=16,
    embed_dim=3,
    cond={"n_stages": 2, "in_channels": 182, "out_channels": 3},
    image_size=64,
)


def seed_script() -> str:
    guides = sorted(SEEDS.glob("*.txt"))
    if not guides:
        pytest.skip(f"no seed guide in {SEEDS}")
    text = guides[0].read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    (script,) = [b for b in blocks if "sample_log" in b]
    return script


def ported(script: str) -> str:
    """The changes a CompVis user makes: the two loading lines, and the device."""
    changes = {
        "from scripts.sample_diffusion import load_model\n": "from segldm.compat.compvis import load_compvis\n",
        "from ldm.data.flickr import FlickrSegEval\n": "from segldm.data.sflckr import FlickrSegEval\n",
        "model, _ = load_model(config, ckpt_path, None, None)": "model = load_compvis(config_path, ckpt_path)",
        "'cuda'": "'cpu'",
    }
    for old, new in changes.items():
        assert old in script, f"the seed script no longer has {old!r}"
        script = script.replace(old, new)
    return script


@pytest.mark.slow  # fast tier under ~15 min on 2 cores (docs/tests.md)
def test_the_seed_inference_script_runs_with_its_imports_changed(tmp_path: Path, monkeypatch) -> None:
    if not FILES.is_dir():
        pytest.skip(f"CompVis data fixture not at {FILES}")
    script = ported(seed_script())
    model_dir = tmp_path / "models" / "ldm" / "semantic_synthesis256"
    write_arch(model_dir, ARCH_SEED_SHAPE)
    root = tmp_path / "data" / "sflckr"
    shutil.copytree(FILES / "images", root / "images")
    shutil.copytree(FILES / "segmentations", root / "segmentations")
    (root / "sflckr_eval.txt").write_text((FILES / "list.txt").read_text())  # 4 scenes: one batch of 4
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(script, "seed_inference.py", "exec"), {"__name__": "__main__"})  # noqa: S102
    for name in ("cond.png", "sample.png"):
        image = np.asarray(Image.open(tmp_path / name))
        assert image.shape[:2] == (260, 1034) and image.std() > 0, (
            name
        )  # save_image: a row of 4, 2 px padding


def test_ddim_sampler_api_matches_segldm_ddim_and_guides() -> None:
    """CompVis's DDIMSampler over a segldm model: eta 0 equals segldm's own DDIM (an eps model: for x0
    the reference's DDIM reads the output as eps, REFERENCE_NOTES, and so does this mirror, while
    segldm's samplers convert it); guidance scale 1 equals no guidance; another scale is
    eps_u + s (eps_c - eps_u) in one batched call."""
    model = direct_model(ARCH_EMA, use_ema=False).eval()
    randomize(model, 0)  # CompVis zero-initialises the UNet's output conv: eps would be 0
    size = model.image_size * model.first_stage_model.downsample_factor
    labels = torch.randint(0, model.cond_stage_model.in_channels, (2, size, size))
    cond = model.get_learned_conditioning(model.condition.one_hot(labels))
    x_T = torch.randn(
        2, model.channels, model.image_size, model.image_size, generator=torch.Generator().manual_seed(1)
    )
    shape = (model.channels, model.image_size, model.image_size)
    ours = model.sample(cond, steps=10, eta=0.0, x_T=x_T, use_ema=False)
    theirs, inter = DDIMSampler(model).sample(
        10, 2, shape, cond, eta=0.0, x_T=x_T, verbose=False, log_every_t=4
    )
    assert torch.allclose(theirs, ours, atol=1e-5)
    assert len(inter["x_inter"]) == 1 + len([i for i in range(10) if i % 4 == 0 or i == 9])
    samples, _ = model.sample_log(cond=cond, batch_size=2, ddim=True, ddim_steps=10, eta=0.0, x_T=x_T)
    assert torch.equal(samples, theirs)
    uncond = torch.zeros_like(cond)
    same, _ = DDIMSampler(model).sample(
        10,
        2,
        shape,
        cond,
        eta=0.0,
        x_T=x_T,
        verbose=False,
        unconditional_guidance_scale=1.0,
        unconditional_conditioning=uncond,
    )
    assert torch.equal(same, theirs)
    calls: list[int] = []
    hook = model.model.diffusion_model.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    guided, _ = DDIMSampler(model).sample(
        10,
        2,
        shape,
        cond,
        eta=0.0,
        x_T=x_T,
        verbose=False,
        unconditional_guidance_scale=3.0,
        unconditional_conditioning=uncond,
    )
    hook.remove()
    assert calls == [4] * 10 and not torch.allclose(guided, theirs)
    with pytest.raises(NotImplementedError, match="inpainting"):
        DDIMSampler(model).sample(10, 2, shape, cond, mask=torch.ones(1), verbose=False)
    with pytest.raises(NotImplementedError, match="ddim=True"):
        model.sample_log(cond=cond, batch_size=2, ddim=False, ddim_steps=10)
