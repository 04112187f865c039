"""Datasets yielding the SFLCKR sample format, and the LightningDataModule that serves them.

Presets (conf/data/*.yaml; docs/data.md, docs/datasets.md): `synthetic`, `sflckr`, `folder`, and the
benchmarks as distributed: `ade20k`, `cocostuff`, `cityscapes`, `celebamask_hq`. The names below are
imported on first use, so `import segldm.data` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # data module and batches
    "SegmentationDataModule": "segldm.data.datamodule",
    "collate_samples": "segldm.data.transforms",
    "SampleError": "segldm.data.transforms",
    "SkippedSample": "segldm.data.transforms",
    "INSTANCE_MAP_KEY": "segldm.data.folder",
    # generic loaders
    "Pair": "segldm.data.folder",
    "PairedSegmentation": "segldm.data.folder",
    "FolderSegmentation": "segldm.data.folder",
    "SyntheticScenes": "segldm.data.synthetic",
    "FlickrSegTrain": "segldm.data.sflckr",
    "FlickrSegEval": "segldm.data.sflckr",
    # benchmarks in their official layouts
    "BenchmarkSegmentation": "segldm.data.layouts",
    "IdRule": "segldm.data.layouts",
    "ADE20K": "segldm.data.ade20k",
    "COCOStuff": "segldm.data.cocostuff",
    "Cityscapes": "segldm.data.cityscapes",
    "CelebAMaskHQ": "segldm.data.celebamask_hq",
    "CELEBAMASK_HQ_PARTS": "segldm.data.celebamask_hq",
}
_RENAMED = {"CELEBAMASK_HQ_PARTS": "PARTS"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'segldm.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), _RENAMED.get(name, name))
