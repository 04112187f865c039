"""Fixtures shared by the protocol segmenters' tests: a test module names its reference fixture folder
as ``FIXTURE`` (``io.pt``, ``keys.txt``) and gets the reference outputs, the keys and the weights of
the deterministic rule (segldm.metrics.segmenters.reference_weights)."""

from __future__ import annotations

import pytest
import torch

from segldm.metrics.segmenters.reference_weights import deterministic_weights, read_keys_file


@pytest.fixture(scope="module")
def io(request) -> dict:
    return torch.load(request.module.FIXTURE / "io.pt", weights_only=True)


@pytest.fixture(scope="module")
def keys(request) -> list[tuple[str, list[int], str]]:
    return read_keys_file(request.module.FIXTURE / "keys.txt")


@pytest.fixture(scope="module")
def weights(keys) -> dict[str, torch.Tensor]:
    return deterministic_weights(keys)
