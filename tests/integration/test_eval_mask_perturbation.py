"""`eval.mask_perturbation`: generation is conditioned on the perturbed masks, every metric scores the
clean ones, and the perturbation is on the protocol card (so perturbed numbers get their own card key).

The tiny setup of tests/integration/test_eval.py (a tiny untrained LDM) with an untrained segmenter saved
in-process, mIoU only (FID reads no masks); the evaluations run in-process. The LDM's zero-initialised
layers (the UNet's output convolutions) get random values, so its images depend on the masks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from segldm.evaluation.common import select_pairs
from segldm.metrics.segmenters.trained import SegmenterModule, SegNet, TrainedSegmenter, segmenter_checkpoint
from segldm.pipeline.mask_perturbations import LabelSpace, SwapRegions
from segldm.runtime.loading import build_ldm, ldm_checkpoint
from segldm.storage.checkpoint_files import save_checkpoint
from tests.conftest import TINY_DATA, TINY_FIRST_STAGE, TINY_UNET, compose_train
from tests.integration.test_eval import EVAL_DATA, compose_eval, root  # noqa: F401

SWAP_ALL = "eval.mask_perturbation={_target_: segldm.pipeline.mask_perturbations.SwapRegions, fraction: 1.0, seed: 3}"


@pytest.fixture(scope="module")
def ldm_ckpt(root: Path) -> Path:  # noqa: F811
    """test_eval's tiny untrained LDM, its zero-initialised weights filled in (else the mask cannot matter)."""
    cfg = compose_train([*TINY_DATA, *EVAL_DATA, *TINY_FIRST_STAGE, *TINY_UNET, f"paths.root_dir={root}"])
    config = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
    }
    torch.manual_seed(0)
    model = build_ldm(config["model"])
    with torch.no_grad():
        for parameter in model.model.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.05)
    path = root / "outputs" / "conditioned_run" / "checkpoints" / "step0000003.ckpt"
    save_checkpoint(ldm_checkpoint(model.state_dict(), config, global_step=3), path)
    return path


@pytest.fixture(scope="module")
def segmenter(root: Path) -> Path:  # noqa: F811
    torch.manual_seed(0)
    path = root / "untrained_segmenter.ckpt"
    save_checkpoint(segmenter_checkpoint(SegmenterModule(SegNet(8, (4, 4, 4))), {}), path)
    return path


def evaluate_into(out: Path, root: Path, ckpt: Path, segmenter: Path, *extra: str) -> dict:  # noqa: F811
    from segldm.evaluation.ldm import evaluate

    overrides = [
        f"ckpt={ckpt}",
        f"paths.root_dir={root}",
        f"paths.output_dir={out}",
        "logger=none",
        f"segmenter.ckpt={segmenter}",
        "metrics.inception=null",  # FID does not read masks; mIoU is the metric that could score the wrong ones
        "eval.steps=5",  # one step sits at t=1, where the mask moves the image by less than a uint8 step
        "eval.use_ema=false",  # the filled-in weights (the EMA copy keeps the zeros)
        "eval.bootstrap.draws=50",
        *extra,
    ]
    evaluate(compose_eval(overrides))
    return json.loads((out / "metrics.json").read_text())


def test_perturbed_masks_condition_generation_and_metrics_score_the_clean_masks(
    root: Path,  # noqa: F811
    ldm_ckpt: Path,  # noqa: F811
    segmenter: Path,
) -> None:
    from segldm.metrics.segmenters import segment_scores

    clean = evaluate_into(root / "clean", root, ldm_ckpt, segmenter)
    perturbed = evaluate_into(root / "swapped", root, ldm_ckpt, segmenter, SWAP_ALL)

    # recorded: metrics.json and the protocol card, whose key differs from the clean run's
    expected = {"name": "swap_regions", "params": {"fraction": 1.0}, "seed": 3, "reference": "segldm"}
    assert perturbed["mask_perturbation"] == perturbed["protocol_card"]["mask_perturbation"] == expected
    assert clean["mask_perturbation"] is None and clean["protocol_card"]["mask_perturbation"] is None
    assert perturbed["protocol_card"]["card_key"] != clean["protocol_card"]["card_key"]
    assert "swap_regions" in (root / "swapped" / "report.md").read_text()

    # generation saw the perturbed masks: masks_perturbed/ are their colours, and the images moved
    datamodule = instantiate(compose_train([*TINY_DATA, *EVAL_DATA]).data)
    pairs = select_pairs(datamodule.val_dataset, None, need_images=True)
    space = LabelSpace(datamodule.n_labels, datamodule.ignore_label)
    swapped = [SwapRegions(fraction=1.0, seed=3)(p.labels, p.index, space) for p in pairs]
    assert all((s != p.labels).any() for s, p in zip(swapped, pairs, strict=True))
    names = [f"{p.name}.png" for p in pairs]
    assert sorted(p.name for p in (root / "swapped" / "masks_perturbed").iterdir()) == names
    assert not (root / "clean" / "masks_perturbed").exists()
    for name in names:
        clean_mask = np.asarray(Image.open(root / "clean" / "masks" / name))
        assert np.array_equal(np.asarray(Image.open(root / "swapped" / "masks" / name)), clean_mask)
        assert not np.array_equal(
            np.asarray(Image.open(root / "swapped" / "masks_perturbed" / name)), clean_mask
        )
    generated = [np.asarray(Image.open(root / "swapped" / "generated" / n).convert("RGB")) for n in names]
    from_clean = [np.asarray(Image.open(root / "clean" / "generated" / n).convert("RGB")) for n in names]
    assert any(not np.array_equal(a, b) for a, b in zip(generated, from_clean, strict=True))

    # every metric scores against the clean masks: mIoU recomputed here from the PNGs
    net = TrainedSegmenter(segmenter)
    n, ignore = datamodule.n_labels, datamodule.ignore_label
    against_clean = segment_scores(net, generated, [p.labels for p in pairs], n, ignore).miou
    against_swapped = segment_scores(net, generated, swapped, n, ignore).miou
    assert against_clean != against_swapped, "the check below could not tell the two apart"
    assert perturbed["miou"] == pytest.approx(against_clean, rel=1e-9, abs=1e-12)
    assert perturbed["miou_real"] == pytest.approx(
        clean["miou_real"]
    )  # real images vs clean masks: unchanged


def test_a_perturbation_that_does_not_fit_the_data_fails_before_sampling(
    root: Path,  # noqa: F811
    ldm_ckpt: Path,  # noqa: F811
    segmenter: Path,
) -> None:
    out = root / "refused"
    with pytest.raises(ValueError, match="no ignore label.*fill=random"):
        evaluate_into(out, root, ldm_ckpt, segmenter, "eval/mask_perturbation=scdm_edge")
    with pytest.raises(Exception, match="classes"):
        evaluate_into(out, root, ldm_ckpt, segmenter, "eval/mask_perturbation=erode")
    assert not (out / "generated").exists()
