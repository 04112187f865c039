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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torchvision.utils import make_grid
from tqdm.auto import tqdm

import segldm  # noqa: F401  (config resolvers)
from segldm.checkpoints import ldm_from_checkpoint, read_checkpoint
from segldm.data.transforms import load_mask, one_hot, out_of_range
from segldm.models.ldm import LatentDiffusion

log = logging.getLogger(__name__)
SPLITS = {"val": "val_dataset", "validation": "val_dataset", "train": "train_dataset"}
GRID_COLUMNS = 8


@dataclass(frozen=True)
class Mask:
    """One condition: its output name, integer label map (H, W) and where it came from."""

    name: str
    labels: np.ndarray
    source: str


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else as torch understands it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(
    ckpt: str | Path, compvis_config: str | None, trust_checkpoint: bool, device: torch.device
) -> LatentDiffusion:
    """A native segldm LDM checkpoint, or a CompVis one together with its config.yaml."""
    if compvis_config:
        from segldm.compat.compvis import load_compvis

        return load_compvis(compvis_config, ckpt, trust_checkpoint=trust_checkpoint, device=device)
    checkpoint = read_checkpoint(ckpt, what="LDM checkpoint", trust_checkpoint=trust_checkpoint)
    return ldm_from_checkpoint(checkpoint, ckpt, device)


def folder_masks(folder: Path, limit: int | None) -> Iterator[Mask]:
    """Every ``*.png`` label map in ``folder`` (sorted by name), or the one file given."""
    files = (
        [folder] if folder.is_file() else sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")
    )
    if not files:
        raise FileNotFoundError(f"masks={folder}: no .png label maps in this folder")
    for path in files[:limit]:
        yield Mask(path.stem, np.asarray(load_mask(path)), str(path))


def split_masks(model: LatentDiffusion, split: str, limit: int | None) -> Iterator[Mask]:
    """Label maps of the checkpoint's own data config (``masks=val`` / ``masks=train``)."""
    from hydra.utils import instantiate

    config = model.segldm_config or {}
    data_cfg = config.get("data")
    if not isinstance(data_cfg, dict) or "_target_" not in data_cfg:
        raise ValueError(
            f"masks={split} needs the data config stored in a segldm checkpoint, and this model has none "
            "(a CompVis checkpoint loaded with compvis_config=?); convert it with python -m segldm.convert "
            "compvis, or pass masks=<folder of label PNGs>"
        )
    datamodule = instantiate(OmegaConf.create(data_cfg))
    dataset = getattr(datamodule, SPLITS[split])
    count = len(dataset) if limit is None else min(limit, len(dataset))
    for index in range(count):
        item = dataset[index]
        if isinstance(item, str):  # a skipped sample (data.on_error=skip) carries its error message
            log.warning("masks=%s: sample %d skipped: %s", split, index, item)
            continue
        if "label_map" in item:
            labels = np.asarray(item["label_map"])
        else:
            labels = np.asarray(item["segmentation"]).argmax(axis=-1)
        yield Mask(f"{split}_{index:05d}", labels.astype(np.int64), f"{split}[{index}]")


def check_mask(mask: Mask, n_labels: int, ignore_label: int | None, multiple: int, why: str) -> None:
    """Labels within the model's range and a size the first stage and UNet can take, else name the file."""
    bad = out_of_range(mask.labels, n_labels, ignore_label)
    if bad.size:
        raise ValueError(
            f"{mask.source}: label(s) {bad.tolist()[:10]} >= n_labels={n_labels} of the model (labels must be "
            f"in [0, {n_labels})"
            + (f" or the ignore label {ignore_label})" if ignore_label is not None else ")")
        )
    height, width = mask.labels.shape[:2]
    if mask.labels.ndim != 2 or height % multiple or width % multiple:
        raise ValueError(
            f"{mask.source}: mask size {width}x{height} is not divisible by {multiple} ({why}); crop or resize "
            f"it to e.g. {max(multiple, width - width % multiple)}x{max(multiple, height - height % multiple)}"
        )


def size_multiple(model: LatentDiffusion) -> tuple[int, str]:
    """Mask sides must be multiples of first-stage factor x UNet downsampling (else skips do not align)."""
    first = int(getattr(model.first_stage_model, "downsample_factor", 1))
    unet = 2 ** (len(getattr(model.model.diffusion_model, "channel_mult", (1,))) - 1)
    return first * unet, f"first-stage factor {first} x UNet downsampling {unet}"


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return images.permute(0, 2, 3, 1).numpy().astype(np.uint8)


def condition_image(model: LatentDiffusion, seg: torch.Tensor) -> torch.Tensor:
    """One mask's ``to_rgb`` picture (min-max over this mask alone, so it does not depend on the batch)."""
    return torch.nan_to_num(model.to_rgb(seg), nan=0.0)  # a one-label mask has max == min


def save_grid_rows(conditions: list[torch.Tensor], samples: list[torch.Tensor], path: Path) -> Path | None:
    """Rows of up to 8: conditions, then their samples below; skipped when the sizes differ."""
    if len({tuple(t.shape) for t in conditions + samples}) != 1:
        log.info("masks have different sizes: no grid written")
        return None
    blank = torch.ones_like(samples[0])
    rows = []
    for start in range(0, len(samples), GRID_COLUMNS):
        chunk = slice(start, start + GRID_COLUMNS)
        pad = [blank] * (GRID_COLUMNS - len(samples[chunk])) if len(samples) > GRID_COLUMNS else []
        rows += [*conditions[chunk], *pad, *samples[chunk], *pad]
    grid = make_grid(
        (torch.stack(rows).clamp(-1, 1) + 1) / 2,
        nrow=min(GRID_COLUMNS, len(samples)),
        padding=2,
        pad_value=1.0,
    )
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
    return path


def sample(cfg: DictConfig) -> dict[str, Any]:
    """Generate one image per mask; returns where everything was written."""
    device = resolve_device(str(cfg.device))
    model = load_model(str(cfg.ckpt), cfg.get("compvis_config"), bool(cfg.trust_checkpoint), device)
    if cfg.use_ema and not model.use_ema:
        log.info("%s has no EMA weights: sampling with the raw UNet weights", cfg.ckpt)
    n_labels = int(model.cond_stage_model.in_channels)
    ignore_label = getattr(model, "ignore_label", None)
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
        source = folder_masks(folder, limit)
    masks = list(source)
    steps = None if cfg.steps is None else int(cfg.steps)
    eta = None if cfg.eta is None else float(cfg.eta)
    model.check_sampler_settings(steps, None, "steps")
    for mask in masks:
        check_mask(mask, n_labels, ignore_label, multiple, why)
    if not masks:
        raise ValueError(f"masks={masks_arg} gave no masks")

    out_dir = Path(cfg.out_dir)
    (out_dir / "samples").mkdir(parents=True, exist_ok=True)
    (out_dir / "conditions").mkdir(parents=True, exist_ok=True)
    model.colorize = torch.randn(3, n_labels, 1, 1, generator=torch.Generator().manual_seed(int(cfg.seed)))
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, mask in enumerate(masks):
        by_shape.setdefault(mask.labels.shape, []).append(index)
    conditions: list[torch.Tensor] = [torch.empty(0)] * len(masks)
    samples: list[torch.Tensor] = [torch.empty(0)] * len(masks)
    batch_size = max(1, int(cfg.batch_size))
    with tqdm(total=len(masks), desc="sampling", unit="img") as progress:
        for indices in by_shape.values():
            for start in range(0, len(indices), batch_size):
                batch = indices[start : start + batch_size]
                seg = torch.stack(
                    [torch.from_numpy(one_hot(masks[i].labels, n_labels, ignore_label)) for i in batch]
                ).permute(0, 3, 1, 2)
                seg = seg.to(device)
                images = model.generate(
                    seg,
                    steps=steps,
                    eta=eta,
                    seeds=[int(cfg.seed) + i for i in batch],
                    use_ema=bool(cfg.use_ema),
                )
                for row, i in enumerate(batch):
                    samples[i] = images[row : row + 1].cpu()
                    conditions[i] = condition_image(model, seg[row : row + 1]).cpu()
                    Image.fromarray(to_uint8(samples[i])[0]).save(
                        out_dir / "samples" / f"{masks[i].name}.png"
                    )
                    Image.fromarray(to_uint8(conditions[i])[0]).save(
                        out_dir / "conditions" / f"{masks[i].name}.png"
                    )
                progress.update(len(batch))
    grid = save_grid_rows([c[0] for c in conditions], [s[0] for s in samples], out_dir / "grid.png")
    manifest = {
        "ckpt": str(cfg.ckpt),
        "compvis_config": cfg.get("compvis_config"),
        "steps": steps if steps is not None else model.sampler_defaults["steps"],
        "eta": eta if eta is not None else model.sampler_defaults["eta"],
        "use_ema": bool(cfg.use_ema and model.use_ema),
        "samples": [
            {"name": m.name, "source": m.source, "seed": int(cfg.seed) + i} for i, m in enumerate(masks)
        ],
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"{len(masks)} samples: {out_dir / 'samples'}\nconditions: {out_dir / 'conditions'}", flush=True)
    if grid is not None:
        print(f"grid:       {grid}", flush=True)
    return {"out_dir": out_dir, "count": len(masks), "grid": grid}


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
