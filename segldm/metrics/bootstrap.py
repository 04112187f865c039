"""How sure an evaluation is: bootstrap intervals of FID and mIoU, precision/recall, real-vs-real FID.

An FID or mIoU measured on N images is one draw; the bootstrap resamples the N evaluated samples
with replacement, each generated image together with its own mask and real image (a paired
bootstrap), and recomputes both metrics on every draw. FID per draw uses the exact low-rank form:
for centred feature matrices A, B (n rows each) tr sqrt(S_A S_B) is the sum of the singular values
of A B^T / (n - 1), so a draw costs one n x n SVD instead of a 2048 x 2048 matrix square root
(equal to torch-fidelity's FID on the full sets; tests/unit/test_metrics_bootstrap.py). mIoU per
draw sums per-image (intersection, predicted, target) pixel counts, the same summed-confusion mIoU
as the full set (`segldm.metrics.miou`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def fid_low_rank(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID between two feature sets of n rows each (float64), via the n x n cross product."""
    if a.shape != b.shape:
        raise ValueError(
            f"the low-rank FID pairs rows: feature sets of shapes {tuple(a.shape)} and {tuple(b.shape)}"
        )
    a, b = a.double(), b.double()
    n = a.shape[0]
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = a - mu_a, b - mu_b
    trace_a = (ca * ca).sum() / (n - 1)
    trace_b = (cb * cb).sum() / (n - 1)
    cross = torch.linalg.svdvals(ca @ cb.T).sum() / (n - 1)
    return float(((mu_a - mu_b) ** 2).sum() + trace_a + trace_b - 2 * cross)


def miou_from_counts(counts: np.ndarray) -> float:
    """mIoU from summed (intersection, predicted, target) pixel counts per class, shape (3, C)."""
    tp, predicted, target = (np.asarray(c, dtype=np.float64) for c in counts)
    union = predicted + target - tp
    present = union > 0
    return float((tp[present] / union[present]).mean()) if present.any() else float("nan")


def bootstrap_intervals(
    fake: torch.Tensor | None,
    real: torch.Tensor | None,
    counts: np.ndarray | None,
    draws: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Intervals of FID (fake vs real features, row i with row i) and mIoU (per-image counts, shape
    (N, 3, C)) from ``draws`` paired resamples of the N samples.

    A resample holds only ~63 % distinct samples, and FID grows as distinct samples shrink (its
    covariances get worse), so the draws sit above the full-set FID (by ~12 at N = 256 on the
    quickstart) and their percentile interval can miss it altogether. Each interval is therefore
    the draws' spread around the full-set value: value + [q_low - median, q_high - median] of the
    draws (a percentile interval shifted by the resampling bias; for mIoU the shift is tiny).
    """
    n = next((len(x) for x in (fake, counts) if x is not None), 0)
    if n < 2 or draws < 1:
        return {"draws": 0, "level": level}
    rng = np.random.default_rng(seed)
    fids, mious = [], []
    for _ in range(draws):
        idx = rng.integers(0, n, size=n)
        if fake is not None and real is not None:
            index = torch.from_numpy(idx)
            fids.append(fid_low_rank(fake[index], real[index]))
        if counts is not None:
            mious.append(miou_from_counts(counts[idx].sum(0)))
    tail = (1 - level) / 2 * 100
    out: dict[str, Any] = {"draws": draws, "level": level, "seed": seed}
    estimates = {
        "fid": fid_low_rank(fake, real) if fids else None,
        "miou": miou_from_counts(counts.sum(0)) if mious else None,
    }
    for name, values in (("fid", fids), ("miou", mious)):
        if values:
            low, median, high = np.nanpercentile(values, [tail, 50, 100 - tail])
            shift = float(estimates[name]) - float(median)
            out[name] = [float(low) + shift, float(high) + shift]
            out[f"{name}_resampling_shift"] = -shift  # median of the draws minus the full-set value
    return out


def precision_recall(fake: torch.Tensor, real: torch.Tensor, neighborhood: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) by torch-fidelity's own function:
    the share of generated samples inside the real manifold (k-NN balls) and vice versa."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    if min(len(fake), len(real)) <= neighborhood:
        raise ValueError(
            f"precision/recall with k={neighborhood} neighbours need more than {neighborhood} images per set, "
            f"got {len(fake)} and {len(real)}"
        )
    out = prc_features_to_metric(
        fake.double(),
        real.double(),
        prc_neighborhood=neighborhood,
        prc_batch_size=10000,
        save_cpu_ram=False,
        verbose=False,
    )
    return {
        "precision": float(out["precision"]),
        "recall": float(out["recall"]),
        "f_score": float(out["f_score"]),
    }


def real_halves_fid(real: torch.Tensor) -> float:
    """FID between the even- and odd-indexed real images: the floor of FID for N/2 vs N/2 images."""
    half = len(real) // 2
    if half < 2:
        raise ValueError(f"real-vs-real FID needs at least 4 real images, got {len(real)}")
    return fid_low_rank(real[0 : 2 * half : 2], real[1 : 2 * half : 2])


def interval_text(value: float | None, interval: Mapping[str, Any] | None, key: str, digits: int) -> str:
    """'12.3 [10.1, 14.9]' (the value, and its bootstrap interval when there is one)."""
    if value is None:
        return "–"
    bounds = (interval or {}).get(key)
    text = f"{value:.{digits}f}"
    return text if not bounds else f"{text} [{bounds[0]:.{digits}f}, {bounds[1]:.{digits}f}]"


__all__ = [
    "bootstrap_intervals",
    "fid_low_rank",
    "interval_text",
    "miou_from_counts",
    "precision_recall",
    "real_halves_fid",
]
