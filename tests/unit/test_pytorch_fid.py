"""pytorch-fid's FID: segldm's numbers are its command's (``python -m pytorch_fid``) on the same PNGs.

The real weights cannot be downloaded here, so the tests put a random-weight
``pt_inception-2015-12-05-6726825d.pth`` (Kaiming-normal convs, so features do not vanish) into a
temporary TORCH_HOME, where the command's ``load_state_dict_from_url`` finds it without network.
The FID itself needs a 2048x2048 ``scipy.linalg.sqrtm`` (~13 s on one CPU thread), twice for the
command and segldm: that end-to-end check is slow; the fast one compares the statistics the
command saves (``--save-stats``), which are all a FID is computed from.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import segldm.metrics.fid as torch_fidelity_fid
from segldm.metrics.fid import InceptionFeatures, InceptionWeights, InceptionWeightsError
from segldm.metrics.pytorch_fid import (
    CONVERTED_FILE,
    PytorchFidFeatures,
    convert_torch_fidelity_to_pytorch_fid,
    implementation_card,
    pytorch_fid_distance,
    pytorch_fid_skeleton,
    pytorch_fid_statistics,
    read_folder_images,
    resolve_pytorch_fid_weights,
)
from segldm.storage.checkpoint_files import CheckpointError
from tests.unit.test_metrics_fid import make_random_inception, noisy_images, smooth_images, write_folder

torch.set_num_threads(1)
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory) -> Path:
    """A TORCH_HOME whose hub cache holds a random-weight file under pytorch-fid's own name."""
    home = tmp_path_factory.mktemp("torch_home")
    hub = home / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.manual_seed(0)
    model = pytorch_fid_skeleton()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(model.state_dict(), hub / PYTORCH_FID_FILE)
    return home


@pytest.fixture(scope="module")
def weights(torch_home: Path) -> InceptionWeights:
    return InceptionWeights(torch_home / "hub" / "checkpoints" / PYTORCH_FID_FILE, "random (test)")


Sets = tuple[Path, Path, list[np.ndarray], list[np.ndarray]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Sets:
    """Two folders of 32x32 PNGs (lossless) and the arrays written into them, in file-name order."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("images")
    images_a = smooth_images(rng, 8)
    images_b = smooth_images(rng, 4) + noisy_images(rng, 4)
    return write_folder(root / "a", images_a), write_folder(root / "b", images_b), images_a, images_b


def start_pytorch_fid_command(torch_home: Path, *args: str) -> subprocess.Popen:
    """``python -m pytorch_fid ...`` on the CPU, unpatched, with the test's TORCH_HOME (started, not awaited)."""
    env = {**os.environ, "TORCH_HOME": str(torch_home), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pytorch_fid", *args]
    command += ["--device", "cpu", "--batch-size", "4", "--num-workers", "0"]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def output_of(command: subprocess.Popen) -> str:
    stdout, stderr = command.communicate(timeout=300)
    assert command.returncode == 0, stderr[-2000:]
    return stdout


def test_statistics_equal_the_command_save_stats(
    tmp_path: Path, torch_home: Path, weights: InceptionWeights, folders: Sets
) -> None:
    """mu and sigma of segldm's features of the arrays in memory are the ones that
    ``python -m pytorch_fid --save-stats`` computes from their PNGs (all a FID is computed from)."""
    folder, _, images, _ = folders
    saved = tmp_path / "a.npz"
    command = start_pytorch_fid_command(torch_home, "--save-stats", str(folder), str(saved))
    features = PytorchFidFeatures(weights, batch_size=4)(images)  # meanwhile: ours
    assert features.shape == (8, 2048) and features.dtype == np.float64
    mu, sigma = pytorch_fid_statistics(features)
    output_of(command)
    with np.load(saved) as reference:
        assert np.abs(reference["mu"]).max() > 1e-3  # the random network does not collapse to 0
        np.testing.assert_allclose(mu, reference["mu"], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(sigma, reference["sigma"], rtol=1e-6, atol=1e-9)
    read_back = read_folder_images(folder)  # the CLI's reading: the command's files, the same arrays
    assert all(np.array_equal(x, y) for x, y in zip(read_back, images, strict=True))


@pytest.mark.slow
def test_fid_equals_the_pytorch_fid_command(
    torch_home: Path, weights: InceptionWeights, folders: Sets
) -> None:
    """The protocol's FID is what ``python -m pytorch_fid a b`` prints (float64 statistics: rel 1e-6)."""
    a, b, images_a, images_b = folders
    command = start_pytorch_fid_command(torch_home, str(a), str(b))
    extractor = PytorchFidFeatures(weights, batch_size=4)
    ours = pytorch_fid_distance(extractor(images_a), extractor(images_b))
    reference = float(re.search(r"FID:\s+(\S+)", output_of(command)).group(1))
    assert reference > 1.0  # the random network separates the sets: not a vacuous 0 == 0
    assert ours == pytest.approx(reference, rel=1e-6)


def test_features_do_not_depend_on_batch_size(weights: InceptionWeights) -> None:
    images = smooth_images(np.random.default_rng(2), 3) + noisy_images(np.random.default_rng(3), 1)
    extractor = PytorchFidFeatures(weights, batch_size=1)
    one = extractor(images)
    extractor.batch_size = 4
    np.testing.assert_allclose(extractor(images), one, rtol=1e-4, atol=1e-5)
    mixed = extractor(images[:2] + [np.zeros((20, 24, 3), np.uint8)])  # sizes differ: one by one
    np.testing.assert_allclose(mixed[:2], one[:2], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"image 0: expected a uint8 \(H, W, 3\) RGB array, got float32"):
        extractor([np.zeros((4, 4, 3), np.float32)])


def test_converted_torch_fidelity_weights_give_torch_fidelity_features(tmp_path: Path) -> None:
    """Same graph: a torch-fidelity-layout file copied into pytorch-fid's layout gives torch-fidelity's
    pool3 features on the same network input. Before the first conv the two differ (pytorch-fid: x/255,
    PyTorch bilinear resize, 2x-1; torch-fidelity: TF1 resize, (x-128)/128): a 299x299 image is not
    resized by either, and x/256 makes pytorch-fid's 2x-1 equal (x-128)/128 exactly."""
    source = make_random_inception(tmp_path / "torch_fidelity_layout.pth", seed=1)
    converted = convert_torch_fidelity_to_pytorch_fid(source, tmp_path / CONVERTED_FILE)
    copied = torch.load(converted, weights_only=True)
    original = torch.load(source, weights_only=True)
    assert list(copied) == list(pytorch_fid_skeleton().state_dict()) == list(original)
    assert all(torch.equal(copied[k], original[k]) for k in original)
    assert json.loads((tmp_path / f"{CONVERTED_FILE}.json").read_text())["converted_from"] == str(source)

    images = np.random.default_rng(4).integers(0, 256, size=(2, 299, 299, 3), dtype=np.uint8)
    theirs = InceptionFeatures(InceptionWeights(source, "test"))(list(images)).double().numpy()
    extractor = PytorchFidFeatures(InceptionWeights(converted, "test"))
    with torch.no_grad():
        body = extractor.model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 256)[0]
    assert np.abs(theirs).max() > 1e-3
    np.testing.assert_allclose(body.squeeze(3).squeeze(2).double().numpy(), theirs, rtol=1e-5, atol=1e-6)
    # the preprocessing difference is real: pytorch-fid's own path (x/255) gives other features
    assert np.abs(extractor(list(images)) - theirs).max() > 1e-3


def test_weights_resolution_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weights: InceptionWeights, torch_home: Path
) -> None:
    models = tmp_path / "models"
    monkeypatch.setattr(torch_fidelity_fid, "fid_helper_torchscript", lambda: None)
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    found = resolve_pytorch_fid_weights(None, models, download=False)
    assert found.path == weights.path and found.source == "pytorch-fid download (hub cache)"
    assert resolve_pytorch_fid_weights(weights.path, models).source.startswith("eval.fid.weights_path")
    # offline: torch-fidelity's file in the hub cache is copied into pytorch-fid's layout once
    empty_home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(empty_home))
    (empty_home / "hub" / "checkpoints").mkdir(parents=True)
    make_random_inception(empty_home / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth")
    found = resolve_pytorch_fid_weights(None, models, download=False)
    assert (
        found.path == models / "inception" / CONVERTED_FILE
        and "copied into pytorch-fid's layout" in found.source
    )
    again = resolve_pytorch_fid_weights(None, models, download=False)
    assert again.path == found.path and again.source.startswith("torch-fidelity-layout file copied")
    card = implementation_card(found)
    assert card["implementation"] == "pytorch-fid" and card["package"] == "pytorch-fid 0.3.0"
    assert card["feature_dims"] == 2048 and len(card["weights"]["sha256"]) == 64
    assert "299" in card["preprocessing"]


def test_no_weights_anywhere_names_every_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_fidelity_fid, "fid_helper_torchscript", lambda: None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(InceptionWeightsError) as info:
        resolve_pytorch_fid_weights(None, tmp_path / "models", download=False)
    message = str(info.value)
    for way_out in (
        PYTORCH_FID_FILE,
        "download disabled",
        "eval.fid.weights_path=",
        "make fid-weights",
        CONVERTED_FILE,
        "eval.fid.implementation=torch-fidelity",
        "eval.fid.backend=none",
    ):
        assert way_out in message, way_out
    with pytest.raises(InceptionWeightsError, match=r"eval.fid.weights_path=.*nope.pth: no such file"):
        resolve_pytorch_fid_weights(tmp_path / "nope.pth", tmp_path)


def test_wrong_layout_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "not_inception.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(
        CheckpointError, match="not_inception.pth is not pytorch-fid/torch-fidelity InceptionV3"
    ):
        PytorchFidFeatures(InceptionWeights(path, "test"))
