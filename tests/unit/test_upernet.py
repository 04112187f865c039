"""UPerNet-ResNet-101 (ADE20K) against the reference outputs of tests/fixtures/upernet101_ade20k.

Weights come from the fixture's deterministic rule (the released files, 300 MB together, cannot be
fetched here). Preprocessed inputs must match bit for bit (same PIL resize, same float32 operations),
the decoder logits to 1e-5 of their max |value| (measured: 1.3e-6), and the labels exactly: these
weights saturate every softmax, so the averaged scores are multiples of 1/3 and many pixels tie
exactly; both sides resolve a tie with ``torch.max`` (the lowest class), and there are no near-ties
(see the fixture README).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from segldm.metrics.segmenters.reference_weights import (
    deterministic_weights,
    weights_sha256,
)
from segldm.metrics.segmenters.upernet import (
    MAX_SIZE,
    PADDING_MULTIPLE,
    RELEASE_URL,
    SCALES,
    ResNetEncoder,
    UPerNet,
    UPerNetSegmenter,
    load_released,
    preprocess,
    scaled_size,
    split_prefixed,
)
from segldm.storage.checkpoint_files import CheckpointError
from tests.conftest import CONF, REPO

torch.set_num_threads(1)
FIXTURE = REPO / "tests" / "fixtures" / "upernet101_ade20k"


@pytest.fixture(scope="module")
def parts(keys) -> dict[str, dict[str, torch.Tensor]]:
    return split_prefixed(deterministic_weights(keys))


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory, parts) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ade20k-resnet101-upernet")
    files = {}
    for part, state_dict in parts.items():  # bare state_dicts, as the released files
        files[part] = folder / f"{part}_epoch_50.pth"
        torch.save(state_dict, files[part])
    return files


@pytest.fixture(scope="module")
def segmenter(weight_files, io) -> UPerNetSegmenter:
    scales = io["meta"]["fixture_scales"]
    return UPerNetSegmenter(weight_files["encoder"], weight_files["decoder"], scales=scales, batch_size=1)


def test_weight_rule_reproduces_the_fixture(keys, parts, io) -> None:
    weights = {f"{part}.{k}": v for part, sd in parts.items() for k, v in sd.items()}
    assert weights_sha256(weights, keys) == io["meta"]["weights_sha256"]
    for line in (FIXTURE / "weights_stats.tsv").read_text().splitlines()[1::7]:  # every 7th entry
        _, key, total, abs_total, first = line.split("\t")
        tensor = weights[key].double()
        assert tensor.sum().item() == pytest.approx(float(total), rel=1e-9, abs=1e-9), key
        assert tensor.abs().sum().item() == pytest.approx(float(abs_total), rel=1e-9, abs=1e-9), key
        assert tensor.flatten()[0].item() == pytest.approx(float(first), rel=1e-7), key


def test_module_names_are_the_released_key_layout(keys) -> None:
    for part, module in (("encoder", ResNetEncoder()), ("decoder", UPerNet(150))):
        want = [(k.removeprefix(f"{part}."), s, d) for k, s, d in keys if k.startswith(f"{part}.")]
        got = [
            (k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in module.state_dict().items()
        ]
        assert got == want, part


def test_preprocessing_matches_valdataset(io) -> None:
    meta = io["meta"]
    release = meta["release_config"]  # config/ade20k-resnet101-upernet.yaml as the reference read it
    assert [release["imgSizes"], release["imgMaxSize"], release["padding_constant"]] == [
        list(SCALES),
        MAX_SIZE,
        PADDING_MULTIPLE,
    ]
    # fixture scales: the normalised inputs bit for bit (PIL resize and float32 /255, -mean, /std as the reference)
    batches = preprocess(io["images_uint8_rgb"], meta["fixture_scales"])
    for s, batch in enumerate(batches):
        assert torch.equal(batch, io[f"input_s{s}"]), s
    # release scales: input sizes (float64 factor, int truncation, next multiple of 32) and a 256 px image's inputs
    for (h, w), sizes in zip(
        io["release_size_cases"].tolist(), io["release_input_sizes"].tolist(), strict=True
    ):
        assert [list(scaled_size(h, w, s, MAX_SIZE, PADDING_MULTIPLE)) for s in SCALES] == sizes, (h, w)
    upscaled = preprocess(io["image_256_uint8_rgb"])
    assert (
        [list(b.shape[2:]) for b in upscaled]
        == meta["input_256_sizes"]
        == [[320, 320], [384, 384], [480, 480], [544, 544], [608, 608]]
    )
    assert [hashlib.sha256(b[0].numpy().tobytes()).hexdigest() for b in upscaled] == meta["input_256_sha256"]


def test_logits_and_labels_match_the_reference(segmenter, io) -> None:
    images = io["images_uint8_rgb"]
    batches = preprocess(images, segmenter.scales)
    with torch.no_grad():
        logits = segmenter.decoder.logits(segmenter.encoder(batches[0]))
    ref = io["decoder_logits_s0"]
    assert logits.shape == ref.shape and (logits - ref).abs().max() <= 1e-5 * ref.abs().max()
    for s, batch in enumerate(batches):  # each scale's own argmax (debug aid for a mismatch below)
        probabilities = segmenter.scale_probabilities(batch, images.shape[2:])
        assert torch.equal(probabilities.argmax(1).to(torch.uint8), io["scale_labels"][s]), s
    assert torch.equal(segmenter.predict(images), io["labels"])


def test_predict_is_batch_independent(segmenter, io) -> None:
    images = io["images_uint8_rgb"]
    segmenter.batch_size = 2
    try:
        assert torch.equal(segmenter.predict(images), io["labels"])
    finally:
        segmenter.batch_size = 1


def test_card_names_both_files_and_the_protocol(segmenter, weight_files) -> None:
    card = segmenter.card()
    assert card["weights"] == {k: str(v) for k, v in weight_files.items()}
    assert (
        card["weights_sha256"]["decoder"] == hashlib.sha256(weight_files["decoder"].read_bytes()).hexdigest()
    )
    assert card["reference"].startswith("CSAILVision/semantic-segmentation-pytorch@8f27c9b")
    assert card["preprocessing"]["scales"] == [48, 64, 80]
    assert segmenter.label_map.lookup(151, None).tolist() == list(range(150)) + [-1]


def test_loads_without_optional_entries_and_refuses_other_files(tmp_path: Path, parts, weight_files) -> None:
    optional = ("num_batches_tracked", "_tmp_running_mean", "_tmp_running_var", "_running_iter")
    bare = {k: v for k, v in parts["decoder"].items() if not k.endswith(optional)}
    assert len(bare) < len(parts["decoder"])
    torch.save(bare, tmp_path / "bare.pth")
    decoder = UPerNet(150)
    load_released(decoder, tmp_path / "bare.pth", "decoder", "decoder_epoch_50.pth")
    torch.testing.assert_close(decoder.conv_last[1].bias, parts["decoder"]["conv_last.1.bias"])

    with pytest.raises(CheckpointError, match=r"not the UPerNet-ResNet-101 encoder.*swapped.*missing key"):
        load_released(ResNetEncoder(), weight_files["decoder"], "encoder", "encoder_epoch_50.pth")
    other = tmp_path / "resnet101_torchvision.pth"  # a 7x7-stem ResNet: wrong shape, missing and extra keys
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 2048)}, other)
    with pytest.raises(
        CheckpointError,
        match=r"missing key.*unexpected key\(s\): fc.weight.*shape mismatch.*conv1.weight: checkpoint \(64, 3, 7, 7\) vs model \(64, 3, 3, 3\)",
    ):
        load_released(ResNetEncoder(), other, "encoder", "encoder_epoch_50.pth")
    absent = tmp_path / "models" / "encoder_epoch_50.pth"
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(absent))}.*{re.escape(RELEASE_URL)}"):
        UPerNetSegmenter(absent, weight_files["decoder"])
    with pytest.raises(ValueError, match=r"segmenter.scales=\[\]"):
        UPerNetSegmenter(weight_files["encoder"], weight_files["decoder"], scales=[])


def test_preset_builds_the_segmenter(weight_files) -> None:
    preset = OmegaConf.load(CONF / "segmenter" / "upernet101_ade20k.yaml")
    root = OmegaConf.create({"paths": {"model_dir": "models"}, "segmenter": preset})
    folder = "models/segmenters/ade20k-resnet101-upernet"
    assert (root.segmenter.encoder_path, root.segmenter.decoder_path) == (
        f"{folder}/encoder_epoch_50.pth",
        f"{folder}/decoder_epoch_50.pth",
    )
    root.segmenter.encoder_path, root.segmenter.decoder_path = map(str, weight_files.values())
    segmenter = instantiate(root.segmenter)
    assert isinstance(segmenter, UPerNetSegmenter)
    assert (segmenter.scales, segmenter.max_size, segmenter.padding_multiple) == (SCALES, 1000, 32)
