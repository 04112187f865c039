"""Slow tier: the quickstart presets, shortened, learn the built-in data: generated regions follow the masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from einops import rearrange

from segldm.data.synthetic import SyntheticScenes, nearest_color_labels
from segldm.runtime.loading import load_ldm
from tests.conftest import run_train


@pytest.mark.slow
@pytest.mark.timeout(2700)  # two shortened trainings, ~12 min on 2 cores
def test_quickstart_generates_images_whose_regions_follow_the_masks(tmp_path):
    run_train(
        ["experiment=quickstart_autoencoder", "trainer.max_steps=700", "scheduler.max_steps=700"],
        tmp_path,
        1200,
        threads=2,
    )
    run_train(["experiment=quickstart", "trainer.max_steps=800"], tmp_path, 1200, threads=2)
    model = load_ldm(tmp_path / "outputs/quickstart/ldm/checkpoints/last.ckpt").eval()
    val = SyntheticScenes(size=64, length=16, seed=1)
    batch = torch.utils.data.default_collate([val[i] for i in range(len(val))])
    seg = rearrange(batch["segmentation"], "b h w c -> b c h w")
    images = model.generate(seg, steps=50, eta=1.0, seeds=list(range(len(val))))
    generated = ((images.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    real = ((batch["image"].numpy() + 1) * 127.5).round().astype(np.uint8)
    labels = batch["label_map"].numpy()
    acc_generated = np.mean(
        [(nearest_color_labels(g) == lab).mean() for g, lab in zip(generated, labels, strict=True)]
    )
    acc_real = np.mean([(nearest_color_labels(r) == lab).mean() for r, lab in zip(real, labels, strict=True)])
    # an untrained model scores ~1/8; the real images are the upper bound
    assert acc_generated > 0.75 * acc_real, (acc_generated, acc_real)
