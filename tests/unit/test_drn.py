"""DRN-D-105 (fyu/drn DRNSeg, Cityscapes) against the reference outputs of tests/fixtures/drn_d_105_cityscapes.

Weights come from the deterministic fill rule (the released ~200 MB file cannot be fetched here). The
reference ran ``segment.py test`` / ``test --ms`` unpatched (Python 3.6, torch 1.10.1, Pillow 8.4); the
stride-8 logits match bit for bit and every label equals the reference's, including multi-scale. Should a
future torch move a pixel whose top-2 gap is a near-tie (the fixture's smallest gaps are a few units on
logits of ~2e7), the label tests allow exactly those pixels, as the fixture README documents.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from segldm.metrics.segmenters.drn import (
    CITYSCAPES_MEAN,
    CITYSCAPES_STD,
    REFERENCE_MS_SCALES,
    DRNSegmenter,
    drn_d_105_seg,
    load_drn_state_dict,
    preprocess,
    trainid_names,
)
from segldm.metrics.segmenters.label_maps import NOT_SCORED, CityscapesTrainIds, apply_label_map
from segldm.metrics.segmenters.reference_weights import weights_sha256
from segldm.storage.checkpoint_files import CheckpointError
from tests.conftest import CONF, REPO

torch.set_num_threads(1)
FIXTURE = REPO / "tests" / "fixtures" / "drn_d_105_cityscapes"
NEAR_TIE = 1e-5  # of max |stride-8 logits|: below this a label may flip with float summation order


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, weights) -> Path:
    path = tmp_path_factory.mktemp("drn") / "drn-d-105_fixture.pth"
    torch.save(weights, path)  # a bare state_dict without BatchNorm counters, as the released file
    return path


@pytest.fixture(scope="module")
def segmenter(weights_file) -> DRNSegmenter:
    return DRNSegmenter(weights_file, batch_size=2)


def assert_labels_match(labels: torch.Tensor, ref: torch.Tensor, margin: torch.Tensor, scale: float) -> None:
    mismatch = labels != ref
    near_tie = margin < NEAR_TIE * scale
    assert not (mismatch & ~near_tie).any(), f"{int(mismatch.sum())} labels differ away from near-ties"


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


def test_module_names_are_the_released_key_layout(keys, io) -> None:
    model = drn_d_105_seg(19)
    own = [(k, list(v.shape)) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert own == [(k, s) for k, s, _ in keys]
    assert len(keys) == io["meta"]["n_keys"] == 543
    assert torch.equal(model.up.weight[0, 0], io["up_weight_init"])  # fill_up_weights' bilinear kernel
    assert torch.equal(model.up.weight, model.up.weight[:1].expand_as(model.up.weight))


def test_normalisation_is_the_reference_to_tensor_and_info_json(io) -> None:
    assert list(CITYSCAPES_MEAN) == io["meta"]["mean"] and list(CITYSCAPES_STD) == io["meta"]["std"]
    assert torch.equal(preprocess(io["images_uint8_rgb"]), io["input"])


def test_logits_and_labels_match_the_reference(segmenter, io) -> None:
    images = io["images_uint8_rgb"]
    with torch.no_grad():
        log_probs, logits = segmenter.model(io["input"])
    scale = io["seg_logits"].abs().max()
    assert (logits - io["seg_logits"]).abs().max() <= 1e-5 * scale
    assert (log_probs[:, :, ::8, ::8] - io["log_probs_sub8"]).abs().max() <= 1e-5 * scale
    labels = segmenter.predict(images)
    assert labels.dtype == torch.int64 and labels.shape == (2, 64, 128)
    assert_labels_match(labels, io["labels"], io["margin"], scale)
    single = torch.cat([segmenter.predict(images[i : i + 1]) for i in range(2)])
    assert_labels_match(single, io["labels"], io["margin"], scale)


def test_up_weights_come_from_the_file(segmenter, weights, io) -> None:
    """The fixture's rule fills up.weight randomly; with the reference's bilinear kernel (what the released
    file holds) the labels are those of the reference run on that variant."""
    assert torch.equal(segmenter.model.up.weight, weights["up.weight"])
    bilinear = dict(weights, **{"up.weight": io["up_weight_init"].expand(19, 1, 16, 16).clone()})
    model = segmenter.model
    try:
        model.load_state_dict(bilinear, strict=False)
        labels = segmenter.predict(io["images_uint8_rgb"])
    finally:
        model.load_state_dict(weights, strict=False)
    assert_labels_match(
        labels, io["labels_bilinear_up"], io["margin_bilinear_up"], io["seg_logits"].abs().max()
    )


def test_multiscale_labels_match_test_ms(weights_file, io) -> None:
    assert list(REFERENCE_MS_SCALES) == io["meta"]["ms_scales"]
    multi = DRNSegmenter(weights_file, scales=REFERENCE_MS_SCALES, batch_size=2)
    labels = multi.predict(io["images_uint8_rgb"])
    assert_labels_match(labels, io["labels_ms"], io["margin_ms"], io["seg_logits"].abs().max())
    assert multi.card()["preprocessing"]["scales"] == [1.0, *REFERENCE_MS_SCALES]


def test_card_class_names_and_label_map(segmenter, weights_file) -> None:
    card = segmenter.card()
    assert card["reference"].startswith("fyu/drn@d75db2ee7070426db7a9264ee61cf489f8cf178c")
    assert card["preprocessing"]["scales"] is None and card["preprocessing"]["mean"] == list(CITYSCAPES_MEAN)
    assert len(card["weights_sha256"]) == 64 and card["weights"] == str(weights_file)
    assert segmenter.class_names == trainid_names()
    assert segmenter.class_names[0] == "road" and segmenter.class_names[13] == "car"
    assert segmenter.class_names[18] == "bicycle" and len(segmenter.class_names) == segmenter.n_classes == 19

    table = segmenter.label_map.lookup(35, None)
    assert isinstance(segmenter.label_map, CityscapesTrainIds)
    expected = {7: 0, 8: 1, 11: 2, 24: 11, 26: 13, 33: 18}  # road, sidewalk, building, person, car, bicycle
    assert all(table[label_id] == train_id for label_id, train_id in expected.items())
    for not_evaluated in (
        0,
        1,
        3,
        6,
        9,
        14,
        29,
        30,
        34,
    ):  # unlabeled, ego vehicle, out of roi, ground, parking, ...
        assert table[not_evaluated] == NOT_SCORED
    assert sorted(int(t) for t in table if t != NOT_SCORED) == list(range(19))
    mask = np.array([[7, 26, 0], [33, 6, 24]])
    assert apply_label_map(table, mask, None).tolist() == [[0, 13, NOT_SCORED], [18, NOT_SCORED, 11]]
    train_ids = segmenter.label_map.lookup(19, 255)  # a trainId-encoded dataset passes through
    assert train_ids.tolist() == list(range(19))
    assert apply_label_map(train_ids, np.array([0, 18, 255]), 255).tolist() == [0, 18, NOT_SCORED]


def test_loader_accepts_counters_and_training_checkpoints(tmp_path: Path, weights) -> None:
    model = drn_d_105_seg(19)
    counters = {k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")}
    training = tmp_path / "checkpoint_latest.pth.tar"  # segment.py train: DataParallel keys in 'state_dict'
    torch.save(
        {"epoch": 1, "state_dict": {f"module.{k}": v for k, v in {**weights, **counters}.items()}}, training
    )
    load_drn_state_dict(model, training)
    torch.testing.assert_close(model.seg.bias, weights["seg.bias"], rtol=0, atol=0)


def test_loader_refuses_other_files_and_names_missing_ones(tmp_path: Path) -> None:
    model = drn_d_105_seg(19)
    camvid = tmp_path / "drn_d_22_camvid.pth"  # another head (11 classes) on no DRN-D-105 base
    torch.save(
        {"seg.weight": torch.zeros(11, 512, 1, 1), "seg.bias": torch.zeros(11), "fc.bias": torch.zeros(9)},
        camvid,
    )
    with pytest.raises(CheckpointError) as error:
        load_drn_state_dict(model, camvid)
    message = str(error.value)
    assert message.startswith(f"{camvid} is not DRN-D-105 (fyu/drn DRNSeg) weights with 19 classes")
    assert "541 missing key(s): base.0.0.weight" in message and "1 unexpected key(s): fc.bias" in message
    assert "seg.bias: checkpoint (11,) vs model (19,)" in message
    absent = tmp_path / "absent.pth"
    with pytest.raises(
        FileNotFoundError, match=r"absent.pth.*drn-d-105_ms_cityscapes.pth.*go.yf.io/drn-cityscapes"
    ):
        DRNSegmenter(absent)
    with pytest.raises(ValueError, match=r"segmenter.scales=\[\]"):
        DRNSegmenter(absent, scales=[])


def test_preset_builds_the_segmenter(weights_file) -> None:
    preset = OmegaConf.load(CONF / "segmenter" / "drn_d_105_cityscapes.yaml")
    root = OmegaConf.create({"paths": {"model_dir": "models"}, "segmenter": preset})
    assert root.segmenter.weights_path == "models/segmenters/drn-d-105_ms_cityscapes.pth"
    root.segmenter.weights_path = str(weights_file)
    segmenter = instantiate(root.segmenter)
    assert isinstance(segmenter, DRNSegmenter) and segmenter.scales is None and segmenter.n_classes == 19
    assert (segmenter.mean, segmenter.std) == (CITYSCAPES_MEAN, CITYSCAPES_STD)
    assert isinstance(segmenter.label_map, CityscapesTrainIds)
