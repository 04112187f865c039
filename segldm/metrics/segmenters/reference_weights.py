"""Deterministic stand-in weights for the protocol segmenters, and their keys files.

The released weight files (100-200 MB each) cannot be fetched on CI, so each segmenter's fixture is
computed by its reference code on weights anyone can rebuild from the keys list alone: entry i of the
state_dict (counting every entry) is drawn from a fresh generator seeded with i, by the role of the
tensor. The fixture generators (experiments/fixtures/*/make_fixture.py) apply the same rule to the
reference networks, so equal labels mean equal networks and equal preprocessing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

KeyList = Sequence[tuple[str, Sequence[int], str]]


def is_batchnorm_weight(key: str, keys: set[str]) -> bool:
    prefix = key.rsplit(".", 1)[0]
    return key.endswith(".weight") and f"{prefix}.running_mean" in keys


def deterministic_weights(keys: KeyList) -> dict[str, torch.Tensor]:
    """The state_dict of the fixture rule: int entries zeros; float entry i from ``manual_seed(i)`` as
    rand+0.5 (running_var), 0.1*randn (running_mean), 1+0.1*randn (BatchNorm weight), else 0.05*randn."""
    names = {key for key, _, _ in keys}
    weights: dict[str, torch.Tensor] = {}
    for i, (key, shape, dtype) in enumerate(keys):
        size = tuple(int(s) for s in shape)
        if dtype.startswith("int"):
            weights[key] = torch.zeros(size, dtype=torch.int64)
            continue
        g = torch.Generator().manual_seed(i)
        if key.endswith("running_var"):
            weights[key] = torch.rand(size, generator=g) + 0.5
        elif key.endswith("running_mean"):
            weights[key] = torch.randn(size, generator=g) * 0.1
        elif is_batchnorm_weight(key, names):
            weights[key] = 1 + 0.1 * torch.randn(size, generator=g)
        else:
            weights[key] = torch.randn(size, generator=g) * 0.05
    return weights


def keys_of(state_dict: Mapping[str, torch.Tensor]) -> list[tuple[str, list[int], str]]:
    """(key, shape, dtype) of every entry, in order ("float32", "int64", ...)."""
    return [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state_dict.items()]


def read_keys_file(path: str | Path) -> list[tuple[str, list[int], str]]:
    """``index<TAB>key<TAB>shape<TAB>dtype`` lines (``#`` comments skipped), in file order."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        _, key, shape, dtype = line.split("\t")
        rows.append((key, [int(s) for s in shape.strip("[]").split(",") if s.strip()], dtype))
    return rows


def write_keys_file(path: str | Path, keys: KeyList, comment: str = "") -> None:
    lines = [f"# {line}" for line in comment.splitlines()] + ["# index\tkey\tshape\tdtype"]
    lines += [
        f"{i}\t{k}\t[{','.join(str(s) for s in shape)}]\t{dtype}" for i, (k, shape, dtype) in enumerate(keys)
    ]
    Path(path).write_text("\n".join(lines) + "\n")


def weights_sha256(weights: Mapping[str, torch.Tensor], keys: KeyList) -> str:
    """sha256 of every tensor's raw bytes, concatenated in keys order."""
    digest = hashlib.sha256()
    for key, _, _ in keys:
        digest.update(weights[key].contiguous().numpy().tobytes())
    return digest.hexdigest()


__all__ = ["deterministic_weights", "keys_of", "read_keys_file", "weights_sha256", "write_keys_file"]
