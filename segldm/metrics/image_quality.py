"""Image quality of generated images against the real ones, from Inception features: FID (with its
floor and ceiling), KID and precision/recall, as one :class:`~segldm.metrics.metric.Metric`.

One pass of the Inception network per image set feeds every number. ``implementation`` picks whose
Inception and whose FID: ``torch-fidelity`` (:mod:`segldm.metrics.fid`: the TF-compatible graph,
KID and precision/recall too) or ``pytorch-fid`` (:mod:`segldm.metrics.pytorch_fid`: what the OASIS
and SDM evaluation code ran; FID only). Beside FID it reports the floor (two disjoint halves of the
real images) and the ceiling (the first stage's own reconstructions of the real images, when the
evaluated model has one): a generated-image FID means little without the two.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from segldm.metrics import pytorch_fid
from segldm.metrics.bootstrap import fid_low_rank, precision_recall, real_halves_fid
from segldm.metrics.fid import (
    EXTRACTOR_NAME,
    InceptionFeatures,
    cached_features,
    fid_kid,
    file_sha256,
    kid_plan,
    resolve_inception_weights,
)
from segldm.metrics.metric import EvalSet, Metric, MetricContext, MetricResult, value_text
from segldm.metrics.reconstruction import first_stage_reconstructions

IMPLEMENTATIONS = ("torch-fidelity", "pytorch-fid")


def images_sha256(images: Sequence[np.ndarray]) -> str:
    """The images themselves as a cache key: any dataset, split, resizing or order changes it."""
    digest = hashlib.sha256()
    for image in images:
        digest.update(str(image.shape).encode() + np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


class InceptionMetrics(Metric):
    """FID / KID / precision-recall of generated vs real images, FID's floor and ceiling."""

    name = "inception"
    directions = {
        "fid": "minimize",
        "kid_mean": "minimize",
        "precision": "maximize",
        "recall": "maximize",
        "first_stage_rfid": "minimize",
        "real_halves_fid": "minimize",
    }
    needs_real = True

    def __init__(
        self,
        implementation: str = "torch-fidelity",
        backend: str = "auto",
        weights_path: str | None = None,
        download: bool = True,
        cache_dir: str | None = None,
        batch_size: int = 32,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        prc_neighborhood: int = 3,
        first_stage_rfid: bool = True,
        reconstruct_batch_size: int = 8,
    ) -> None:
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"eval.fid.implementation={implementation!r}: expected one of {IMPLEMENTATIONS}")
        self.implementation = implementation
        self.backend = backend
        self.weights_path = weights_path
        self.download = bool(download)
        self.cache_dir = cache_dir
        self.batch_size = int(batch_size)
        self.kid_subsets, self.kid_subset_size = int(kid_subsets), int(kid_subset_size)
        self.prc_neighborhood = int(prc_neighborhood)
        self.first_stage_rfid = bool(first_stage_rfid)
        self.reconstruct_batch_size = int(reconstruct_batch_size)
        self.extractor: Any = None
        self.weights: Any = None
        self._real_memo: dict[str, tuple[torch.Tensor, Any, bool]] = {}  # in-training: the same real set each time

    @property
    def enabled(self) -> bool:
        return self.extractor is not None

    def setup(self, context: MetricContext) -> None:
        """Find and load the Inception weights (the error names every way to get them)."""
        if self.backend == "none":
            return
        if self.implementation == "pytorch-fid":
            self.weights = pytorch_fid.resolve_pytorch_fid_weights(
                self.weights_path, context.model_dir, download=self.download
            )
            self.extractor = pytorch_fid.PytorchFidFeatures(
                self.weights, device=context.device, batch_size=self.batch_size
            )
        else:
            self.weights = resolve_inception_weights(
                self.backend, self.weights_path, context.model_dir, download=self.download
            )
            if self.weights is not None:
                self.extractor = InceptionFeatures(
                    self.weights, device=context.device, batch_size=self.batch_size
                )
        if self.enabled and self.implementation == "torch-fidelity" and context.num_samples:
            _, _, note = kid_plan(self.kid_subsets, self.kid_subset_size, context.num_samples, context.num_samples)
            if note:
                print(f"eval.fid.kid_subset_size={self.kid_subset_size}: {note}", flush=True)

    def features(self, images: Sequence[np.ndarray], which: str) -> torch.Tensor:
        return torch.as_tensor(self.extractor(images, desc=f"Inception features ({which})"))

    def real_features(self, real: Sequence[np.ndarray]) -> tuple[torch.Tensor, Any, bool]:
        digest = images_sha256(real)
        if digest in self._real_memo:
            return self._real_memo[digest]
        key = {
            "real_images_sha256": digest,
            "extractor": EXTRACTOR_NAME if self.implementation == "torch-fidelity" else "pytorch-fid",
            "weights_sha256": file_sha256(self.weights.path),
        }
        self._real_memo[digest] = cached_features(self.cache_dir, key, lambda: self.features(real, "real"))
        return self._real_memo[digest]

    def distance(self, fake: torch.Tensor, real: torch.Tensor) -> dict[str, Any]:
        if self.implementation == "pytorch-fid":
            return {"fid": pytorch_fid.pytorch_fid_distance(fake.double().numpy(), real.double().numpy())}
        return fid_kid(fake, real, self.kid_subsets, self.kid_subset_size)

    def compute(self, images: EvalSet) -> MetricResult:
        if not self.enabled:
            return MetricResult({"fid": None, "kid_mean": None, "kid_std": None}, {"backend": "none"})
        if images.real is None:
            raise ValueError("FID needs the real images: the data yields masks only (use eval.fid.backend=none)")
        fake = self.features(images.generated, "generated")
        real, cache_file, hit = self.real_features(images.real)
        values: dict[str, float | None] = {}
        details: dict[str, Any] = {"real_features_cache": str(cache_file) if cache_file else None}
        details["real_features_cache_hit"] = hit
        distances = self.distance(fake, real)
        values["fid"] = float(distances["fid"])
        if self.implementation == "torch-fidelity":
            values["kid_mean"], values["kid_std"] = distances["kid_mean"], distances["kid_std"]
            details |= {k: distances[k] for k in ("kid_subsets", "kid_subset_size", "kid_note")}
            if min(len(fake), len(real)) > self.prc_neighborhood:
                pr = precision_recall(fake, real, self.prc_neighborhood)
                values |= {"precision": pr["precision"], "recall": pr["recall"]}
        values["real_halves_fid"] = real_halves_fid(real) if len(real) >= 4 else None
        reconstructed = (
            first_stage_reconstructions(images, self.reconstruct_batch_size) if self.first_stage_rfid else None
        )
        if reconstructed is not None:
            values["first_stage_rfid"] = float(
                self.distance(self.features(reconstructed, "reconstructed"), real)["fid"]
            )
        paired = len(fake) == len(real)

        def resample(idx: np.ndarray) -> Mapping[str, float]:
            index = torch.from_numpy(idx)
            return {"fid": fid_low_rank(fake[index], real[index])}

        return MetricResult(values, details, resample if paired else None)

    def card(self) -> dict[str, Any]:
        if not self.enabled:
            return {"metric": self.name, "implementation": None}
        if self.implementation == "pytorch-fid":
            return {"metric": self.name, **pytorch_fid.implementation_card(self.weights)}
        import torch_fidelity

        return {
            "metric": self.name,
            "implementation": "torch-fidelity",
            "version": torch_fidelity.__version__,
            "feature_extractor": f"{EXTRACTOR_NAME} pool3 (2048-d), TF1-compatible bilinear resize to 299",
            "weights": self.weights.describe(),
            "kid": {"subsets": self.kid_subsets, "subset_size": self.kid_subset_size},
            "prc_neighborhood": self.prc_neighborhood,
        }

    def report_rows(
        self, result: MetricResult, intervals: Mapping[str, Sequence[float]]
    ) -> list[tuple[str, str, str]]:
        v = result.values
        rows = [
            (
                "FID",
                value_text(v.get("fid"), intervals.get("fid"), 2),
                f"floor {value_text(v.get('real_halves_fid'), None, 2)} (two real halves, N/2 each); ceiling "
                f"{value_text(v.get('first_stage_rfid'), None, 2)} (its first stage's rFID at this N: reconstructions of the same real images)",
            )
        ]
        if self.implementation == "torch-fidelity":
            kid = None if v.get("kid_mean") is None else 1000 * v["kid_mean"]
            std = "" if v.get("kid_std") is None else f" ± {1000 * v['kid_std']:.2f}"
            rows.append(("KID (x1000)", value_text(kid, None, 2) + std, ""))
            pr = (
                "–"
                if v.get("precision") is None
                else f"{v['precision']:.3f} / {v['recall']:.3f}"
            )
            rows.append((f"precision / recall (k = {self.prc_neighborhood})", pr, "needs more than k images per set"))
        return rows


__all__ = ["IMPLEMENTATIONS", "InceptionMetrics", "images_sha256"]
