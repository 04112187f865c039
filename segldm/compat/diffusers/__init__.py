"""diffusers in and out: segldm models as diffusers pipelines, diffusers VQModels as segldm first stages.

:mod:`.export` writes a pipeline folder from a segldm LDM checkpoint (``python -m segldm.convert
diffusers``); :mod:`.unet` and :mod:`.scheduler` translate the UNet and the noise schedule;
:mod:`.pipeline` is the pipeline code itself (it imports only diffusers, so it travels with the
folder). A diffusers ``VQModel`` folder is read as a first stage by
:mod:`segldm.models.diffusers_vq` (``model.first_stage.ckpt_path=<folder>``). Importing this package
does not import diffusers; the classes and functions that need it load it when used.
"""

from __future__ import annotations

from typing import Any

from segldm.compat.diffusers.export import (
    export_diffusers,
    load_pipeline,
    pipeline_classes,
    require_diffusers,
)

__all__ = [
    "SegLDMCondStage",
    "SegLDMPipeline",
    "export_diffusers",
    "load_pipeline",
    "pipeline_classes",
    "require_diffusers",
]


def __getattr__(name: str) -> Any:
    """``SegLDMPipeline`` and ``SegLDMCondStage`` from :mod:`.pipeline`, imported (with diffusers) on first use."""
    if name in ("SegLDMPipeline", "SegLDMCondStage"):
        return getattr(pipeline_classes(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
