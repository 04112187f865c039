"""A segldm LDM checkpoint -> a diffusers pipeline folder (``python -m segldm.convert diffusers``).

The folder::

    model_index.json        SegLDMPipeline and its four components
    pipeline_segldm.py      the pipeline code (segldm/compat/diffusers/pipeline.py, no segldm import)
    vqvae/                  diffusers VQModel: the frozen first stage (scaling_factor = model.scale_factor)
    unet/                   diffusers UNet2DModel: in_channels = latent + condition channels
    cond_stage/             SegLDMCondStage (CompVis SpatialRescaler) + a copy of pipeline_segldm.py
    scheduler/              DDIMScheduler with the training schedule and CompVis's DDIM conventions
    segldm.json             where it came from and segldm's sampler defaults
    README.md               how to load it

Each model is built by diffusers from its config and loaded strictly, so a mapping error surfaces
here, not in a user's pipeline. The UNet weights are the EMA weights when the checkpoint has them
(what ``segldm.sample`` uses by default) unless ``use_ema=False``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from segldm.compat.diffusers.scheduler import scheduler_config
from segldm.compat.diffusers.unet import diffusers_unet_config
from segldm.compat.diffusers.unet import to_diffusers as unet_to_diffusers
from segldm.models.cond_stage import SpatialRescaler
from segldm.models.diffusers_vq import DiffusersLayoutError, diffusers_config
from segldm.models.diffusers_vq import to_diffusers as vq_to_diffusers
from segldm.runtime.loading import ldm_from_checkpoint
from segldm.storage.checkpoint_files import load_strict, read_checkpoint
from segldm.training.ldm import LatentDiffusion

PIPELINE_FILE = "pipeline_segldm"  # module name of the copied pipeline code, in model_index.json
COMPONENTS = ("vqvae", "unet", "cond_stage", "scheduler")
INSTALL_HELP = "diffusers is not installed: pip install 'segldm[diffusers]' (or pip install diffusers)"
PIPELINE_SOURCE = Path(__file__).with_name("pipeline.py")  # copied into every export
PIPELINE_MODULE = "segldm.compat.diffusers.pipeline"


def require_diffusers() -> Any:
    """The diffusers module, or an ImportError saying which install brings it."""
    try:
        import diffusers
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(INSTALL_HELP) from err
    return diffusers


def pipeline_classes() -> Any:
    """The module segldm/compat/diffusers/pipeline.py. It subclasses diffusers' classes, so it is imported
    when first asked for (diffusers is an optional dependency; nothing imports this module back)."""
    require_diffusers()
    return importlib.import_module(PIPELINE_MODULE)


def cond_stage_config(model: LatentDiffusion) -> dict[str, Any]:
    """SegLDMCondStage arguments for the model's cond stage and condition (refusing what it cannot take)."""
    cond_stage, condition = model.cond_stage_model, model.condition
    if not isinstance(cond_stage, SpatialRescaler):
        raise DiffusersLayoutError(
            f"the cond stage is a {type(cond_stage).__name__}; the diffusers export knows segldm's SpatialRescaler"
        )
    if condition.instance_edges:
        raise DiffusersLayoutError(
            "the model conditions on instance edges (data.instance_edges=true): the exported pipeline takes label "
            "maps only; export a model trained without instance edges"
        )
    mapper = getattr(cond_stage, "channel_mapper", None)
    return {
        "n_labels": int(condition.n_labels),
        "ignore_label": None if condition.ignore_label is None else int(condition.ignore_label),
        "n_stages": int(cond_stage.n_stages),
        "method": str(cond_stage.method),
        "multiplier": float(cond_stage.multiplier),
        "out_channels": int(cond_stage.out_channels) if cond_stage.remap_output else None,
        "bias": bool(mapper is not None and mapper.bias is not None),
    }


def diffusers_components(model: LatentDiffusion, use_ema: bool = True) -> dict[str, Any]:
    """The four diffusers components of a loaded LDM, each loaded strictly with the mapped weights."""
    diffusers, pipeline_module = require_diffusers(), pipeline_classes()
    first_stage = model.first_stage_model
    scale = float(model.scale_factor)
    vq_cfg = diffusers_config(first_stage.ddconfig, first_stage.n_embed, first_stage.embed_dim, scale)
    vqvae = diffusers.VQModel(**{k: v for k, v in vq_cfg.items() if not k.startswith("_")})
    load_strict(
        vqvae,
        vq_to_diffusers(first_stage.state_dict(), first_stage.ddconfig),
        "first_stage_model.*",
        "diffusers VQModel",
    )
    unet_module = model.model.diffusion_model
    weights = unet_module.state_dict()
    if use_ema and model.use_ema:  # the EMA shadows, as segldm.sample uses them by default
        with model.ema_scope():
            weights = {k: v.clone() for k, v in unet_module.state_dict().items()}
    unet_cfg = diffusers_unet_config(unet_module)
    unet = diffusers.UNet2DModel(**{k: v for k, v in unet_cfg.items() if not k.startswith("_")})
    load_strict(
        unet, unet_to_diffusers(weights, unet_module), "model.diffusion_model.*", "diffusers UNet2DModel"
    )
    cond_stage = pipeline_module.SegLDMCondStage(**cond_stage_config(model))
    if cond_stage.channel_mapper is not None:
        load_strict(
            cond_stage.channel_mapper,
            model.cond_stage_model.channel_mapper.state_dict(),
            "cond_stage_model.*",
            "SegLDMCondStage",
        )
    sched_cfg = scheduler_config(_diffusion_options(model), model.sampler_settings.as_config())
    scheduler = diffusers.DDIMScheduler.from_config(
        {k: v for k, v in sched_cfg.items() if k != "_class_name"}
    )
    return {
        "vqvae": vqvae.eval(),
        "unet": unet.eval(),
        "cond_stage": cond_stage.eval(),
        "scheduler": scheduler,
    }


def _diffusion_options(model: LatentDiffusion) -> dict[str, Any]:
    """``model.diffusion`` as stored with the model (its config), else rebuilt from the model's buffers' names."""
    stored = ((model.segldm_config or {}).get("model") or {}).get("diffusion")
    if stored:
        return dict(stored)
    raise DiffusersLayoutError(
        "the model carries no model.diffusion config (segldm_config); cannot write its scheduler"
    )


def export_diffusers(
    ckpt: str | Path,
    out: str | Path,
    *,
    use_ema: bool = True,
    trust_checkpoint: bool = False,
    overwrite: bool = False,
) -> dict[str, Path]:
    """segldm LDM checkpoint (``.ckpt`` or ``.safetensors``) -> a diffusers pipeline folder at ``out``."""
    require_diffusers()
    checkpoint = read_checkpoint(ckpt, what="segldm LDM checkpoint", trust_checkpoint=trust_checkpoint)
    model = ldm_from_checkpoint(checkpoint, ckpt)
    components = diffusers_components(model, use_ema=use_ema)
    out = Path(out).resolve()
    existing = [out / n for n in (*COMPONENTS, "model_index.json") if (out / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{', '.join(map(str, existing))} already exist; choose another out dir or pass --overwrite"
        )
    out.mkdir(parents=True, exist_ok=True)
    for name, component in components.items():
        if (out / name).exists():
            shutil.rmtree(out / name)
        component.save_pretrained(out / name)
    code = PIPELINE_SOURCE.read_text()
    (out / f"{PIPELINE_FILE}.py").write_text(code)
    (out / "cond_stage" / f"{PIPELINE_FILE}.py").write_text(
        code
    )  # diffusers loads custom components from their folder
    write_model_index(out)
    (out / "segldm.json").write_text(
        json.dumps(provenance(ckpt, model, use_ema), indent=2, sort_keys=True) + "\n"
    )
    (out / "README.md").write_text(readme(ckpt, model))
    return {"folder": out, "model_index": out / "model_index.json"}


def write_model_index(out: Path) -> Path:
    """model_index.json: the pipeline class from the folder's own code, diffusers classes for the rest."""
    diffusers = require_diffusers()
    index = {
        "_class_name": [PIPELINE_FILE, "SegLDMPipeline"],
        "_diffusers_version": diffusers.__version__,
        "vqvae": ["diffusers", "VQModel"],
        "unet": ["diffusers", "UNet2DModel"],
        "cond_stage": [PIPELINE_FILE, "SegLDMCondStage"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    path = out / "model_index.json"
    path.write_text(json.dumps(index, indent=2) + "\n")
    return path


def provenance(ckpt: str | Path, model: LatentDiffusion, use_ema: bool) -> dict[str, Any]:
    """What segldm.json records: the source file, its step, the weights used and segldm's sampler defaults."""
    config = model.segldm_config or {}
    return {
        "source_checkpoint": str(Path(ckpt).resolve()),
        "unet_weights": "ema" if (use_ema and model.use_ema) else "raw",
        "sampler_defaults": model.sampler_settings.as_config(),
        "data": {
            k: v
            for k, v in (config.get("data") or {}).items()
            if k in ("n_labels", "ignore_label", "size", "name")
        },
        "written_by": "python -m segldm.convert diffusers",
    }


def readme(ckpt: str | Path, model: LatentDiffusion) -> str:
    steps = model.sampler_settings.steps
    return f"""# segldm mask-conditioned latent diffusion (diffusers format)

Exported from `{Path(ckpt).name}` by `python -m segldm.convert diffusers`: a label map of
{model.condition.n_labels} classes in, an image out.

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("<this folder>", trust_remote_code=True)  # runs pipeline_segldm.py
label_map = torch.zeros(1, 256, 256, dtype=torch.long)  # class ids, (B, H, W) or (H, W)
images = pipe(label_map, num_inference_steps={steps}, eta=0.0, generator=[torch.Generator().manual_seed(0)]).images
```

With segldm installed: `segldm.compat.diffusers.load_pipeline("<this folder>")` (no remote code).
One generator per sample (a list) draws the same noise as `segldm.sample` with those seeds.
"""


def load_pipeline(folder: str | Path, device: str | torch.device | None = None) -> Any:
    """An exported folder as a :class:`SegLDMPipeline`, built from segldm's copy of the pipeline code
    and diffusers' own ``from_pretrained`` of each component (nothing executed from the folder)."""
    diffusers, pipeline_module = require_diffusers(), pipeline_classes()
    folder = Path(folder)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise DiffusersLayoutError(
            f"{folder} has no model_index.json: not a pipeline folder written by segldm.convert diffusers"
        )
    index = json.loads(index_path.read_text())
    if index.get("_class_name") != [PIPELINE_FILE, "SegLDMPipeline"]:
        raise DiffusersLayoutError(
            f"{index_path} describes a {index.get('_class_name')} pipeline, not segldm's SegLDMPipeline; load it with "
            "diffusers.DiffusionPipeline.from_pretrained"
        )
    # without accelerate diffusers falls back to a plain load (and says so on every model): ask for it
    plain = {"low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None}
    pipe = pipeline_module.SegLDMPipeline(
        vqvae=diffusers.VQModel.from_pretrained(folder / "vqvae", **plain),
        unet=diffusers.UNet2DModel.from_pretrained(folder / "unet", **plain),
        cond_stage=pipeline_module.SegLDMCondStage.from_pretrained(folder / "cond_stage", **plain),
        scheduler=diffusers.DDIMScheduler.from_pretrained(folder / "scheduler"),
    )
    return pipe.to(device) if device is not None else pipe


__all__ = ["COMPONENTS", "diffusers_components", "export_diffusers", "load_pipeline", "require_diffusers"]
