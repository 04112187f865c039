"""``python -m segldm.sample ckpt=<file> masks=<folder|val|train>``: images for segmentation masks.

Writes ``<out_dir>/samples/<name>.png`` (DDIM, EMA weights when the checkpoint has them, as the
reference inference), ``<out_dir>/conditions/<name>.png`` (the mask through the model's ``to_rgb``
projection, as the seed's inference script shows it), ``<out_dir>/grid.png`` (conditions above
samples) and ``<out_dir>/manifest.json`` (checkpoint, sampler settings, seed of every image).
Sample i gets its own generator seeded with ``seed + i``, so an image does not depend on the batch
it was drawn in.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from PIL import Image

import segldm  # noqa: F401  (config resolvers)
from segldm.compat.compvis import load_compvis
from segldm.condition import ConditionError
from segldm.config.locations import hydra_config_path
from segldm.config.startup import reports_startup_errors
from segldm.pipeline.generation import SamplingSettings, generate, resolve_device, to_uint8
from segldm.pipeline.masks import (
    SPLITS,
    check_mask,
    fit_mask,
    folder_masks,
    model_resolution,
    size_multiple,
    split_masks,
)
from segldm.pipeline.visualize import save_grid_rows
from segldm.runtime.checks import check_config_shapes
from segldm.runtime.loading import ldm_from_checkpoint
from segldm.storage.checkpoint_files import read_checkpoint
from segldm.training.ldm import LatentDiffusion

log = logging.getLogger(__name__)


def load_model(
    ckpt: str | Path, compvis_config: str | None, trust_checkpoint: bool, device: torch.device
) -> LatentDiffusion:
    """A native segldm LDM checkpoint, or a CompVis one together with its config.yaml."""
    if compvis_config:
        return load_compvis(compvis_config, ckpt, trust_checkpoint=trust_checkpoint, device=device)
    checkpoint = read_checkpoint(ckpt, what="LDM checkpoint", trust_checkpoint=trust_checkpoint)
    return ldm_from_checkpoint(checkpoint, ckpt, device)


def sample(cfg: DictConfig) -> dict[str, Any]:
    """Generate one image per mask; returns where everything was written."""
    device = resolve_device(str(cfg.device))
    model = load_model(str(cfg.ckpt), cfg.get("compvis_config"), bool(cfg.trust_checkpoint), device)
    if cfg.use_ema and not model.use_ema:
        log.info("%s has no EMA weights: sampling with the raw UNet weights", cfg.ckpt)
    condition = model.condition
    multiple, why = size_multiple(model)
    limit = None if cfg.num_samples is None else int(cfg.num_samples)
    masks_arg = str(cfg.masks)
    if masks_arg in SPLITS:
        source = split_masks(model, masks_arg, limit)
    else:
        folder = Path(masks_arg)
        if not folder.exists():
            raise FileNotFoundError(
                f"masks={masks_arg}: no such folder or file (or say masks=val / masks=train for the checkpoint's data)"
            )
        instances = cfg.get("instances")
        if condition.instance_edges and not instances:
            raise ConditionError(
                f"{cfg.ckpt} conditions on instance edges (data.instance_edges=true): pass instances=<folder of "
                "instance-id PNGs named like the masks>, or masks=val / masks=train"
            )
        source = folder_masks(folder, limit, condition, Path(instances) if instances else None)
    resolution = model_resolution(model)
    masks = [fit_mask(m, str(cfg.get("resize", "model")), resolution, multiple) for m in source]
    settings = SamplingSettings(
        sampler=cfg.get("sampler"),
        steps=None if cfg.steps is None else int(cfg.steps),
        eta=None if cfg.eta is None else float(cfg.eta),
        use_ema=bool(cfg.use_ema),
        batch_size=int(cfg.batch_size),
        guidance_scale=None if cfg.get("guidance_scale") is None else float(cfg.guidance_scale),
    )
    model.check_sampler_settings(
        settings.steps,
        settings.sampler,
        "steps",
        settings.guidance_scale,
        "guidance_scale",
        bool(cfg.get("force_guidance", False)),
    )
    for mask in masks:
        check_mask(mask, condition, multiple, why)
    if not masks:
        raise ValueError(f"masks={masks_arg} gave no masks")

    out_dir = Path(cfg.out_dir)
    (out_dir / "samples").mkdir(parents=True, exist_ok=True)
    (out_dir / "conditions").mkdir(parents=True, exist_ok=True)
    seeds = [int(cfg.seed) + i for i in range(len(masks))]
    inputs = [condition.sample_input(m.sample()) for m in masks]
    generated = generate(model, inputs, seeds, settings, progress="sampling")
    model.colorize = torch.randn(
        3, condition.channels, 1, 1, generator=torch.Generator().manual_seed(int(cfg.seed))
    )
    conditions = []
    for mask, image in zip(masks, generated.images, strict=True):
        batch = {k: torch.as_tensor(v)[None] for k, v in mask.sample().items()}
        seg = condition.model_input(batch, fused=False)  # the dense map (one-hot, + edges)
        # one mask's to_rgb picture (min-max over this mask alone); a one-label mask has max == min
        conditions.append(torch.nan_to_num(model.to_rgb(seg), nan=0.0)[0].cpu())
        Image.fromarray(to_uint8(image[None])[0]).save(out_dir / "samples" / f"{mask.name}.png")
        Image.fromarray(to_uint8(conditions[-1][None])[0]).save(out_dir / "conditions" / f"{mask.name}.png")
    grid = save_grid_rows(conditions, generated.images, out_dir / "grid.png")
    used = model.sampler_settings.override(
        settings.sampler, settings.steps, settings.eta, settings.guidance_scale
    )
    manifest = {
        "ckpt": str(cfg.ckpt),
        "compvis_config": cfg.get("compvis_config"),
        "sampler": used.name,
        "steps": used.steps,
        "eta": used.eta,
        "use_ema": bool(cfg.use_ema and model.use_ema),
        "guidance_scale": used.guidance_scale,
        "samples": [
            {"name": m.name, "source": m.source, "seed": s} for m, s in zip(masks, seeds, strict=True)
        ],
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"{len(masks)} samples: {out_dir / 'samples'}\nconditions: {out_dir / 'conditions'}", flush=True)
    if grid is not None:
        print(f"grid:       {grid}", flush=True)
    return {"out_dir": out_dir, "count": len(masks), "grid": grid}


@hydra.main(version_base="1.3", config_path=hydra_config_path(), config_name="sample")
@reports_startup_errors
def main(cfg: DictConfig) -> None:
    check_config_shapes(cfg)  # a value of the wrong kind fails here, before the checkpoint is read
    sample(cfg)


if __name__ == "__main__":
    main()
