"""Evaluation protocols: what a paper's evaluation code did, checked before sampling, and the protocol
card recorded with every number.

A protocol preset (``eval/protocol=spade|oasis|sdm``, ``conf/eval/protocol/``) states, per dataset,
the resolution images are generated and compared at, the real reference set, N, the FID
implementation, the image format and the segmenter. :func:`check_protocol` refuses what would make a
number incomparable (a dataset the protocol does not define, another FID implementation, JPEG under a
PNG protocol, another segmenter) and, with ``eval.strict_protocol=true``, a different N or resolution;
with ``false`` those are recorded as deviations and the number is marked not comparable. The card
(:func:`protocol_card`) goes into metrics.json, report.md and the MLflow run; :func:`card_key` is
what two numbers must share to stand in one column.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from segldm.errors import StartupError

IMAGE_FORMATS = ("png", "jpg")


class ProtocolError(StartupError, ValueError):
    """An evaluation that would not be the protocol it names."""


def dataset_name(data_cfg: Mapping[str, Any]) -> str:
    """The data preset a data config came from (``conf/data/<name>.yaml``), from its validation
    dataset's module: ``segldm.data.ade20k.ADE20K`` -> ``ade20k``."""
    validation = data_cfg.get("validation") or {}
    target = str(validation.get("_target_", "") if isinstance(validation, Mapping) else "")
    parts = target.split(".")
    if len(parts) >= 3 and parts[0] == "segldm" and parts[1] == "data":
        return parts[2]
    return target or "unknown"


@dataclass
class ProtocolPlan:
    """A protocol resolved for one dataset: its settings and where this evaluation departs from them."""

    name: str | None
    dataset: str
    settings: dict[str, Any] = field(default_factory=dict)
    about: dict[str, Any] = field(default_factory=dict)
    deviations: list[str] = field(default_factory=list)

    @property
    def comparable(self) -> bool:
        return self.name is not None and not self.deviations


def protocol_settings(protocol: Mapping[str, Any] | None) -> dict[str, Any]:
    if protocol is None:
        return {}
    return OmegaConf.to_container(protocol, resolve=True) if isinstance(protocol, DictConfig) else dict(protocol)


def check_protocol(
    protocol: Mapping[str, Any] | None,
    dataset: str,
    *,
    fid_implementation: str | None,
    image_format: str,
    segmenter_choice: str | None,
    num_samples: int,
    split_size: int,
    resolution: Sequence[int],
    strict: bool,
) -> ProtocolPlan:
    """The protocol for this dataset, or a ProtocolError naming the setting and the way out."""
    if image_format not in IMAGE_FORMATS:
        raise ProtocolError(f"eval.image_format={image_format!r}: expected one of {IMAGE_FORMATS}")
    spec = protocol_settings(protocol)
    name = spec.get("name")
    if not name:
        return ProtocolPlan(None, dataset)
    datasets = spec.get("datasets") or {}
    if dataset not in datasets:
        raise ProtocolError(
            f"eval/protocol={name} defines {', '.join(sorted(datasets)) or 'no dataset'}, not this data "
            f"({dataset}); evaluate without a protocol (eval/protocol=none) or on one of those datasets"
        )
    settings = dict(datasets[dataset] or {})
    about = {k: spec.get(k) for k in ("paper", "code", "fid_implementation", "image_format")}
    wanted_fid = spec.get("fid_implementation")
    if wanted_fid and fid_implementation and fid_implementation != wanted_fid:
        raise ProtocolError(
            f"eval/protocol={name} computes FID with {wanted_fid}, but eval.fid.implementation="
            f"{fid_implementation}; drop the override (the protocol sets it)"
        )
    wanted_format = str(spec.get("image_format") or "png")
    if image_format != wanted_format:
        raise ProtocolError(
            f"eval.image_format={image_format} under eval/protocol={name}, whose code wrote "
            f"{wanted_format.upper()} (JPEG artefacts move FID and mIoU); use eval.image_format={wanted_format}"
        )
    wanted_segmenter = settings.get("segmenter")
    if wanted_segmenter and segmenter_choice and segmenter_choice != wanted_segmenter:
        raise ProtocolError(
            f"eval/protocol={name} scores {dataset} with segmenter={wanted_segmenter}, not "
            f"segmenter={segmenter_choice}; pass segmenter={wanted_segmenter} (weights: conf/segmenter/"
            f"{wanted_segmenter}.yaml)"
        )
    plan = ProtocolPlan(name, dataset, settings, about)
    wanted_n = settings.get("num_samples")
    if wanted_n is not None and int(wanted_n) != num_samples:
        plan.deviations.append(
            f"N={num_samples} generated images, the protocol's is {wanted_n} (split holds {split_size})"
        )
    wanted_size = settings.get("size")
    if wanted_size is not None and list(wanted_size) != list(resolution):
        plan.deviations.append(
            f"resolution {list(resolution)} (HxW), the protocol's is {list(wanted_size)} (data.size / data.aspect)"
        )
    pre_resize = spec.get("fid_resize_before_inception")
    if pre_resize:
        plan.deviations.append(
            f"the protocol's FID resized every image first ({pre_resize}); segldm feeds images at their "
            "generated size (the same numbers only where that size is already the target)"
        )
    if plan.deviations and strict:
        raise ProtocolError(
            f"eval/protocol={name} on {dataset}: "
            + "; ".join(plan.deviations)
            + ". Numbers made otherwise are not the protocol's; to measure anyway, marked not comparable, "
            "pass eval.strict_protocol=false"
        )
    return plan


def protocol_card(
    plan: ProtocolPlan,
    metric_cards: Mapping[str, Any],
    *,
    num_samples: int,
    resolution: Sequence[int],
    image_format: str,
    sampler: Mapping[str, Any],
    seeds: Sequence[int],
    mask_perturbation: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything a number depends on: protocol, data, N, resolution, metrics' implementations and
    weights, sampler, guidance, seeds, and the perturbation of the conditioning masks (if any)."""
    card = {
        "protocol": plan.name,
        "dataset": plan.dataset,
        "protocol_settings": plan.settings,
        "protocol_source": plan.about,
        "num_samples": num_samples,
        "resolution": list(resolution),
        "image_format": image_format,
        "sampler": dict(sampler),
        "seed_range": [min(seeds), max(seeds)] if seeds else None,
        "metrics": dict(metric_cards),
        "deviations": list(plan.deviations),
        "comparable": plan.comparable,
        "mask_perturbation": None if mask_perturbation is None else dict(mask_perturbation),
    }
    card["card_key"] = card_key(card)
    return card


LOCATION_KEYS = ("path", "weights", "source", "real_features_cache")


def without_locations(value: Any) -> Any:
    """A card without file locations (the same weights at another path are the same weights: their
    sha256 stays): a location key's string is dropped, and of a location mapping only its sha256s stay."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if k in LOCATION_KEYS and isinstance(v, str | None):
                continue
            if k in LOCATION_KEYS and isinstance(v, Mapping):
                v = {name: digest for name, digest in v.items() if "sha256" in str(name)}
            out[k] = without_locations(v)
        return out
    if isinstance(value, list):
        return [without_locations(v) for v in value]
    return value


def card_key(card: Mapping[str, Any]) -> str:
    """What two numbers must share to stand in one column: protocol, dataset, N, resolution, format,
    and every metric's implementation and weights (sampler settings may differ: they are the rows), and
    a perturbation of the conditioning masks (only when there is one: clean cards keep their keys)."""
    fixed = {k: card.get(k) for k in ("protocol", "dataset", "num_samples", "resolution", "image_format")}
    fixed["metrics"] = without_locations(card.get("metrics"))
    if card.get("mask_perturbation") is not None:
        fixed["mask_perturbation"] = card["mask_perturbation"]
    return hashlib.sha256(json.dumps(fixed, sort_keys=True, default=str).encode()).hexdigest()[:16]


__all__ = [
    "IMAGE_FORMATS",
    "ProtocolError",
    "ProtocolPlan",
    "card_key",
    "check_protocol",
    "dataset_name",
    "protocol_card",
]
