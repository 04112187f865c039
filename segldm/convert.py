"""``python -m segldm.convert``: CompVis LatentDiffusion <-> segldm checkpoints.

``compvis --config C --ckpt K --out D`` writes ``D/model.ckpt`` (a native segldm LDM checkpoint: the
weights plus the resolved run config) and ``D/config.yaml`` (a Hydra config over segldm's
``conf/``: ``python -m segldm.train --config-dir D --config-name config`` fine-tunes from the
converted weights through ``init_from``). ``export --ckpt S --out D`` writes the CompVis layout
(``D/config.yaml`` for ``ldm.models.diffusion.ddpm.LatentDiffusion``, ``D/model.ckpt`` with
``state_dict`` and ``global_step``); the weights are written unchanged, so export -> convert
round-trips bit-exactly. ``--format safetensors`` writes ``model.safetensors`` instead of
``model.ckpt`` (the config's ``init_from`` and first-stage path then name it).

``weights --ckpt S --out F.safetensors`` writes any segldm checkpoint (an LDM or first-stage training
checkpoint) as a weights-only safetensors file, with its kind and run config in the metadata: it
is accepted wherever a weights file is (``init_from``, ``model.first_stage.ckpt_path``,
``segldm.sample ckpt=``, ``segldm.eval ckpt=``); resuming a run still needs the ``.ckpt``.

``diffusers S OUT`` writes a diffusers pipeline folder (VQModel, UNet2DModel, DDIMScheduler, the
cond stage and the pipeline code; :mod:`segldm.compat.diffusers`, docs/diffusers.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

import segldm  # noqa: F401  (config resolvers)
from segldm.compat.compvis import (
    CompVisConfigError,
    Translation,
    compvis_config_from_segldm,
    model_from_compvis,
    read_compvis_checkpoint,
    translate_config,
)
from segldm.compat.diffusers import export_diffusers  # imports diffusers only when it runs
from segldm.config import locations
from segldm.errors import StartupError
from segldm.runtime.checks import validate_config
from segldm.runtime.loading import build_ldm, ldm_checkpoint, ldm_config_of
from segldm.storage.checkpoint_files import (
    CheckpointError,
    load_strict,
    read_checkpoint,
    save_checkpoint,
    state_dict_of,
)
from segldm.storage.safetensors_files import SUFFIX as SAFETENSORS_SUFFIX
from segldm.storage.safetensors_files import save_safetensors_checkpoint

CONFIG_NAME = "config.yaml"
CKPT_NAME = "model.ckpt"
WEIGHTS_NAMES = {"ckpt": CKPT_NAME, "safetensors": f"model{SAFETENSORS_SUFFIX}"}  # --format -> file name


def save_weights(checkpoint: dict[str, Any], path: Path, format: str) -> Path:
    """A checkpoint dict as ``format``: torch.save (``ckpt``) or weights-only safetensors."""
    if format == "safetensors":
        return save_safetensors_checkpoint(checkpoint, path)
    return save_checkpoint(checkpoint, path)


def _prepare_out(out: str | Path, overwrite: bool, weights_name: str = CKPT_NAME) -> Path:
    out = Path(out).resolve()
    existing = [out / n for n in (CONFIG_NAME, weights_name) if (out / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{', '.join(map(str, existing))} already exist; choose another --out or pass --overwrite"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def hydra_config(
    translation: Translation, model: Mapping[str, Any], init_from: Path, data_root: str | None = None
) -> dict[str, Any]:
    """The Hydra primary config (over conf/train.yaml) that rebuilds this model and starts from its weights."""
    data = dict(translation.data)
    if data_root is not None:
        data["root"] = str(Path(data_root).resolve())
    return {
        "defaults": [
            "train",
            {"override /data": translation.data_group},
            {"override /scheduler": translation.scheduler_group},
            "_self_",
        ],
        "task_name": "finetune",
        "init_from": str(init_from),
        "model": dict(model),
        "data": data,
        "scheduler": dict(translation.scheduler),
    }


def compose_run_config(config_dir: Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Compose ``config_dir/config.yaml`` over segldm's conf/ exactly as ``segldm.train`` would, resolved."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose(
            config_name=Path(CONFIG_NAME).stem,
            overrides=[
                f"hydra.searchpath=[file://{locations.config_dir()}]",
                f"paths.output_dir={config_dir}",
                *overrides,
            ],
        )
    check = cfg.copy()
    check.model.first_stage.ckpt_path = None  # not written yet; validated for everything else
    check.model.require_pretrained_first_stage = False
    validate_config(check)
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def convert_compvis(
    config: str | Path,
    ckpt: str | Path,
    out: str | Path,
    *,
    trust_checkpoint: bool = False,
    overwrite: bool = False,
    data_root: str | None = None,
    format: str = "ckpt",
) -> dict[str, Path]:
    """CompVis config + checkpoint -> ``out/model.ckpt`` (native segldm; ``format="safetensors"``:
    ``out/model.safetensors``) and ``out/config.yaml`` (Hydra)."""
    translation = translate_config(config)
    checkpoint = read_compvis_checkpoint(ckpt, trust_checkpoint)
    model, model_cfg = model_from_compvis(translation, checkpoint, ckpt)
    out = _prepare_out(out, overwrite, WEIGHTS_NAMES[format])
    ckpt_out = out / WEIGHTS_NAMES[format]
    # The LDM checkpoint's first_stage_model.* is a valid first-stage file, so the config needs no other.
    model_cfg["first_stage"]["ckpt_path"] = str(ckpt_out)
    model_cfg["require_pretrained_first_stage"] = True
    header = (
        f"# segldm config of the CompVis model {Path(str(config)).resolve()}\n"
        f"#   + {Path(ckpt).resolve()}, written by `python -m segldm.convert compvis`.\n"
        f"# Fine-tune (starts from {ckpt_out.name} via init_from, fresh optimizer):\n"
        f"#   python -m segldm.train --config-dir {out} --config-name config [overrides]\n"
        f"# Sample: python -m segldm.sample ckpt={ckpt_out} masks=<folder of label PNGs>\n"
    )
    config_path = out / CONFIG_NAME
    config_path.write_text(
        header
        + OmegaConf.to_yaml(OmegaConf.create(hydra_config(translation, model_cfg, ckpt_out, data_root)))
    )
    run_config = compose_run_config(out)
    # The composed config must rebuild exactly this architecture (defaults merged under it included).
    load_strict(
        build_ldm(run_config["model"]), model.state_dict(), config_path, "the model the written config builds"
    )
    source = {"config": str(Path(str(config)).resolve()), "checkpoint": str(Path(ckpt).resolve())}
    save_weights(
        ldm_checkpoint(
            model.state_dict(), run_config, int(checkpoint.get("global_step", 0) or 0), compvis=source
        ),
        ckpt_out,
        format,
    )
    return {"config": config_path, "ckpt": ckpt_out}


def export_compvis(
    ckpt: str | Path,
    out: str | Path,
    *,
    trust_checkpoint: bool = False,
    overwrite: bool = False,
    format: str = "ckpt",
) -> dict[str, Path]:
    """segldm LDM checkpoint -> ``out/config.yaml`` + ``out/model.ckpt`` (or ``model.safetensors``) in CompVis's layout."""
    checkpoint = read_checkpoint(ckpt, what="segldm LDM checkpoint", trust_checkpoint=trust_checkpoint)
    run_config = ldm_config_of(checkpoint, ckpt)
    state_dict = state_dict_of(checkpoint, ckpt, "segldm LDM checkpoint")
    compvis_cfg = compvis_config_from_segldm(run_config)
    # What CompVis (and load_compvis) will build from the exported config must take these weights.
    model_from_compvis(translate_config(compvis_cfg), {"state_dict": state_dict}, ckpt)
    out = _prepare_out(out, overwrite, WEIGHTS_NAMES[format])
    config_path = out / CONFIG_NAME
    config_path.write_text(
        f"# CompVis latent-diffusion config of the segldm checkpoint {Path(ckpt).resolve()},\n"
        "# written by `python -m segldm.convert export`. Use with the CompVis code (main.py --base, or\n"
        "# instantiate_from_config(config.model) + load_state_dict), or segldm.compat.compvis.load_compvis.\n"
        + OmegaConf.to_yaml(OmegaConf.create(compvis_cfg))
    )
    ckpt_out = save_weights(
        {"state_dict": state_dict, "global_step": int(checkpoint.get("global_step", 0) or 0)},
        out / WEIGHTS_NAMES[format],
        format,
    )
    return {"config": config_path, "ckpt": ckpt_out}


def convert_weights(
    ckpt: str | Path, out: str | Path, *, trust_checkpoint: bool = False, overwrite: bool = False
) -> Path:
    """Any segldm checkpoint -> a weights-only safetensors file (state_dict + kind, config and step as metadata).

    ``out`` is the file (``.safetensors``) or a folder to write ``model.safetensors`` into.
    """
    checkpoint = read_checkpoint(ckpt, what="checkpoint", trust_checkpoint=trust_checkpoint)
    state_dict_of(checkpoint, ckpt, "checkpoint")
    out = Path(out)
    if out.is_dir() or not out.suffix:
        out = out / WEIGHTS_NAMES["safetensors"]
    if out.suffix != SAFETENSORS_SUFFIX:
        raise StartupError(f"--out {out}: a safetensors file ends in {SAFETENSORS_SUFFIX}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    return save_safetensors_checkpoint(checkpoint, out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m segldm.convert",
        description="Convert CompVis LatentDiffusion checkpoints to segldm and back.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    compvis = sub.add_parser(
        "compvis", help="CompVis config + model.ckpt -> segldm checkpoint + Hydra config"
    )
    compvis.add_argument("--config", required=True, help="the CompVis config.yaml of the model")
    compvis.add_argument("--ckpt", required=True, help="the CompVis model.ckpt")
    compvis.add_argument("--out", required=True, help="output folder (model.ckpt, config.yaml)")
    compvis.add_argument(
        "--data-root", default=None, help="dataset root written as data.root (default: data/sflckr)"
    )
    export = sub.add_parser("export", help="segldm LDM checkpoint -> CompVis config.yaml + model.ckpt")
    export.add_argument("--ckpt", required=True, help="a segldm LDM checkpoint (training run or converted)")
    export.add_argument("--out", required=True, help="output folder (model.ckpt, config.yaml)")
    for p in (compvis, export):
        p.add_argument(
            "--format",
            choices=sorted(WEIGHTS_NAMES),
            default="ckpt",
            help="weights file written: model.ckpt (torch.save) or model.safetensors (weights only)",
        )
    weights = sub.add_parser(
        "weights", help="segldm checkpoint (LDM or first stage) -> weights-only .safetensors with its config"
    )
    weights.add_argument("--ckpt", required=True, help="a segldm checkpoint (.ckpt of a run, or converted)")
    weights.add_argument(
        "--out", required=True, help="the .safetensors file (or a folder: <out>/model.safetensors)"
    )
    to_diffusers = sub.add_parser(
        "diffusers",
        help="segldm LDM checkpoint -> diffusers pipeline folder (VQModel, UNet2DModel, DDIM, docs/diffusers.md)",
    )
    to_diffusers.add_argument("ckpt", help="a segldm LDM checkpoint (.ckpt or .safetensors)")
    to_diffusers.add_argument(
        "out", help="output folder (model_index.json, vqvae/, unet/, cond_stage/, scheduler/)"
    )
    to_diffusers.add_argument(
        "--no-ema", action="store_true", help="export the raw UNet weights instead of the EMA ones"
    )
    for p in (compvis, export, weights, to_diffusers):
        p.add_argument(
            "--trust-checkpoint",
            action="store_true",
            help="allow checkpoints that need pickled Python objects (runs code from the file)",
        )
        p.add_argument("--overwrite", action="store_true", help="replace existing files in --out")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "compvis":
            paths = convert_compvis(
                args.config,
                args.ckpt,
                args.out,
                trust_checkpoint=args.trust_checkpoint,
                overwrite=args.overwrite,
                data_root=args.data_root,
                format=args.format,
            )
            print(f"segldm checkpoint: {paths['ckpt']}\nHydra config:      {paths['config']}")
            print(f"sample:    python -m segldm.sample ckpt={paths['ckpt']} masks=<folder of label PNGs>")
            print(
                f"fine-tune: python -m segldm.train --config-dir {paths['config'].parent} --config-name config"
            )
        elif args.command == "export":
            paths = export_compvis(
                args.ckpt,
                args.out,
                trust_checkpoint=args.trust_checkpoint,
                overwrite=args.overwrite,
                format=args.format,
            )
            print(f"CompVis config:     {paths['config']}\nCompVis checkpoint: {paths['ckpt']}")
        elif args.command == "weights":
            path = convert_weights(
                args.ckpt, args.out, trust_checkpoint=args.trust_checkpoint, overwrite=args.overwrite
            )
            print(f"weights (safetensors): {path}")
        else:
            paths = export_diffusers(
                args.ckpt,
                args.out,
                use_ema=not args.no_ema,
                trust_checkpoint=args.trust_checkpoint,
                overwrite=args.overwrite,
            )
            print(f"diffusers pipeline: {paths['folder']}")
            print(
                f"load: DiffusionPipeline.from_pretrained('{paths['folder']}', trust_remote_code=True), or "
                f"segldm.compat.diffusers.load_pipeline('{paths['folder']}')"
            )
    except (
        CheckpointError,
        CompVisConfigError,
        StartupError,
        FileNotFoundError,
        FileExistsError,
        ModuleNotFoundError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
