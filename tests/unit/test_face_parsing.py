"""The CelebAMask-HQ face-parsing U-Net against tests/fixtures/unet_celebamask_hq (imaginaire's Unet).

Weights come from the fixture's deterministic rule (the released model.pth sits on Google Drive);
logits must match the reference to 1e-5 of max |logits| and the 512x512 labels exactly, except
documented near-ties.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from segldm.data.celebamask_hq import CLASS_NAMES as DATA_CLASS_NAMES
from segldm.errors import MissingFileError
from segldm.metrics.segmenters.face_parsing import (
    CLASS_NAMES,
    FaceParsingSegmenter,
    FaceParsingUNet,
    load_face_parsing_state_dict,
    preprocess,
)
from segldm.metrics.segmenters.label_maps import LabelSpaceMismatch
from segldm.metrics.segmenters.reference_weights import weights_sha256
from segldm.storage.checkpoint_files import CheckpointError
from tests.conftest import CONF, REPO

torch.set_num_threads(1)
FIXTURE = REPO / "tests" / "fixtures" / "unet_celebamask_hq"


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, weights) -> Path:
    path = tmp_path_factory.mktemp("face_parsing") / "model.pth"
    torch.save(weights, path)  # a bare state_dict, as the released model.pth
    return path


@pytest.fixture(scope="module")
def segmenter(weights_file) -> FaceParsingSegmenter:
    return FaceParsingSegmenter(weights_file, batch_size=2)


@pytest.fixture(scope="module")
def labels_512(segmenter, io) -> torch.Tensor:
    return segmenter.predict_at_input_size(io["images_uint8_rgb"])


def test_weight_rule_reproduces_the_fixture(keys, weights, io) -> None:
    assert weights_sha256(weights, keys) == io["meta"]["weights_sha256"]
    for line in (FIXTURE / "weights_stats.tsv").read_text().splitlines():
        if line.startswith("#"):
            continue
        _, key, total, abs_total, first = line.split("\t")
        tensor = weights[key].double()
        assert tensor.sum().item() == pytest.approx(float(total), rel=1e-9, abs=1e-9)
        assert tensor.abs().sum().item() == pytest.approx(float(abs_total), rel=1e-9)
        assert tensor.flatten()[0].item() == pytest.approx(float(first), rel=1e-7)


def test_module_names_are_the_released_key_layout(keys) -> None:
    model = FaceParsingUNet()
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == [(k, s) for k, s, _ in keys]


def test_preprocessing_is_imaginaires(io) -> None:
    images = io["images_uint8_rgb"]
    # ToTensor + Normalize(0.5, 0.5) exactly, before the bicubic resize the reference forward does
    torch.testing.assert_close(preprocess(images, input_size=64), io["input_normalized"], rtol=0, atol=0)
    x = preprocess(images)
    assert x.shape == (2, 3, 512, 512) and x.min() < -1.0  # bicubic overshoot is kept, as the reference
    # the masks' own size: the resize to 512 with align_corners=True is the identity
    big = torch.randint(
        0, 256, (1, 3, 512, 512), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(preprocess(big), (big.float() / 255 - 0.5) / 0.5, rtol=0, atol=0)
    with pytest.raises(ValueError, match="expected uint8 RGB"):
        preprocess(images.float())


def test_logits_and_labels_match_the_reference(segmenter, labels_512, io) -> None:
    logits = segmenter.logits(io["images_uint8_rgb"])
    top, bottom, left, right = io["meta"]["logits_crop"]
    tol = 1e-5 * io["logits_crop"].abs().max()
    assert (logits[:, :, top:bottom, left:right] - io["logits_crop"]).abs().max() <= tol
    assert (logits[:, :, ::16, ::16] - io["logits_stride16"]).abs().max() <= tol
    mismatch = (labels_512 != io["labels_512"].long()).nonzero().tolist()
    near_ties = {tuple(p) for p in io["near_ties"].tolist()}
    assert all(tuple(p) in near_ties for p in mismatch), mismatch[:5]
    assert len(mismatch) <= len(near_ties) <= 8


def test_labels_at_image_size_are_the_512_map_sampled_nearest(segmenter, labels_512, io) -> None:
    images = io["images_uint8_rgb"]
    labels = segmenter.predict(images)
    assert labels.shape == (2, 64, 64) and labels.dtype == torch.int64
    assert torch.equal(labels, labels_512[:, ::8, ::8])  # pixel i <- 512 px row i * 512 // 64
    single = torch.cat([segmenter.predict(images[i : i + 1]) for i in range(2)])
    assert torch.equal(single, labels)


def test_label_map_and_names_are_the_datasets(segmenter) -> None:
    assert list(CLASS_NAMES) == list(DATA_CLASS_NAMES) == segmenter.class_names
    assert segmenter.n_classes == 19
    np.testing.assert_array_equal(segmenter.label_map.lookup(19, None), np.arange(19))
    with pytest.raises(LabelSpaceMismatch, match="data.n_labels=20"):
        segmenter.label_map.lookup(20, None)
    card = segmenter.card()
    assert card["reference"].startswith("NVlabs/imaginaire@c6f74845")
    assert len(card["weights_sha256"]) == 64 and "bicubic to 512x512" in card["preprocessing"]["resize"]


def test_wrong_and_missing_files_are_refused(tmp_path: Path, weights) -> None:
    no_counters = {k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "no_counters.pth"
    torch.save({f"module.{k}": v for k, v in no_counters.items()}, path)  # DataParallel, old torch
    model = FaceParsingUNet()
    load_face_parsing_state_dict(model, path)
    torch.testing.assert_close(model.final.bias, weights["final.bias"])

    wider = FaceParsingUNet(feature_scale=2).state_dict()
    other = tmp_path / "feature_scale2.pth"
    torch.save(wider, other)
    with pytest.raises(
        CheckpointError, match=r"feature_scale2.pth is not the CelebAMask-HQ .*shape mismatch"
    ):
        load_face_parsing_state_dict(FaceParsingUNet(), other)
    bisenet = tmp_path / "79999_iter.pth"
    torch.save({"cp.resnet.conv1.weight": torch.zeros(64, 3, 7, 7)}, bisenet)
    with pytest.raises(CheckpointError, match=r"missing key\(s\): center.*1 unexpected key\(s\): cp.resnet"):
        load_face_parsing_state_dict(FaceParsingUNet(), bisenet)
    with pytest.raises(MissingFileError, match=r"absent.pth.*1o1m-eT38zNCIFldcRaoWcLvvBtY8S4W3"):
        FaceParsingSegmenter(tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="segmenter.input_size=500"):
        FaceParsingSegmenter(path, input_size=500)


def test_preset_builds_the_segmenter(weights_file) -> None:
    preset = OmegaConf.load(CONF / "segmenter" / "unet_celebamask_hq.yaml")
    root = OmegaConf.create({"paths": {"model_dir": "models"}, "segmenter": preset})
    assert root.segmenter.weights_path == "models/segmenters/celebamask_hq_face_parsing_unet.pth"
    root.segmenter.weights_path = str(weights_file)
    segmenter = instantiate(root.segmenter)
    assert isinstance(segmenter, FaceParsingSegmenter)
    assert (segmenter.input_size, segmenter.align_corners) == (512, True)
