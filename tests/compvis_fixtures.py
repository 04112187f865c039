"""Locate and load the CompVis reference fixtures (made with the reference code; see REFERENCE_NOTES.md).

The folder is ``<repo parent>/shared/fixtures/compvis`` unless ``SEGLDM_FIXTURES`` points elsewhere.
Tests that need it skip with a reason when it is absent.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch

REQUIRED_FILES: tuple[str, ...] = ("io.pt", "model.ckpt", "config.yaml")


def fixtures_dir() -> Path:
    """The CompVis fixture root (``SEGLDM_FIXTURES`` overrides the default next to the repo)."""
    env = os.environ.get("SEGLDM_FIXTURES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "compvis"


def model_fixture_dirs() -> list[Path]:
    """Every model folder that has ``io.pt``, ``model.ckpt`` and ``config.yaml``, sorted by name."""
    root = fixtures_dir()
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.is_dir() and all((d / f).is_file() for f in REQUIRED_FILES))


SKIP_REASON = f"CompVis fixtures not found under {fixtures_dir()} (set SEGLDM_FIXTURES)"


@functools.cache
def load_io(folder: Path) -> dict[str, torch.Tensor]:
    """Reference inputs/outputs of one fixture (cached: several tests share them)."""
    return torch.load(folder / "io.pt", map_location="cpu", weights_only=True)


@functools.cache
def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The fixture's full LatentDiffusion ``state_dict``."""
    return torch.load(folder / "model.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@functools.cache
def load_config(folder: Path) -> dict[str, Any]:
    """The fixture's CompVis config as plain containers."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(folder / "config.yaml"), resolve=True)  # type: ignore[return-value]


def sub_state_dict(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Entries under ``prefix`` with the prefix stripped."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def read_keys_file(path: Path) -> dict[str, tuple[int, ...]]:
    """``name -> shape`` from a ``keys.txt``-style file (``name<TAB>[d0, d1]<TAB>dtype`` per line)."""
    out: dict[str, tuple[int, ...]] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        name, shape, _dtype = line.split("\t")
        dims = shape.strip("[]").strip()
        out[name] = tuple(int(d) for d in dims.split(",")) if dims else ()
    return out


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4, name: str = "") -> None:
    """max|actual - expected| <= rel * max(1, max|expected|) (the fixture README's tolerance)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.detach().double() - expected.double()).abs().max().item()
    bound = rel * max(1.0, expected.abs().max().item())
    assert err <= bound, f"{name}: max abs err {err:.3g} > {bound:.3g}"
