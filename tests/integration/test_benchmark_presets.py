"""Each benchmark preset end to end on a tiny copy in its official layout: 3 CPU training steps through
`python -m segldm.train`, then `python -m segldm.sample` on the validation masks (and, with instance
edges, on a folder of label and instance PNGs), with and without the instance-edge channel.
The GPU experiment presets compose and pass the start-up checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from segldm.condition import ConditionError
from segldm.runtime.checks import validate_config
from segldm.sample import sample
from tests.conftest import CONF, TINY_FIRST_STAGE, TINY_UNET, compose_train, run_train
from tests.unit.test_data_benchmarks import make_ade, make_celeba, make_cityscapes, make_coco

SMALL = [
    "model=ldm_seg",
    *TINY_FIRST_STAGE,
    *TINY_UNET,
    "model.first_stage.ckpt_path=null",
    "model.require_pretrained_first_stage=false",
    "data.size=32",
    "data.batch_size=2",
    "data.num_workers=0",
    "data.persistent_workers=false",
    "data.pin_memory=false",
    "data.precheck=full",
    "trainer=cpu",
    "trainer.precision=32-true",
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=1",
    "callbacks.model_checkpoint.every_n_train_steps=3",
    "callbacks.sample_grid.every_n_steps=0",
    "callbacks.sample_grid.num_samples=2",
    "callbacks.sample_grid.ddim_steps=5",
    "logger=none",
]

CASES = {
    # name: (data option, writer, overrides, edges)
    "ade20k": ("ade20k", make_ade, [], False),
    "celebamask_hq": ("celebamask_hq", make_celeba, [], False),
    "cocostuff": ("cocostuff", lambda r: make_coco(r, instances=False), [], False),
    "cocostuff+edges": (
        "cocostuff",
        make_coco,
        [
            "data.instance_edges=true",
            "data.train_instances=${data.root}/instances/train2017",
            "data.val_instances=${data.root}/instances/val2017",
        ],
        True,
    ),
    "cityscapes": ("cityscapes", make_cityscapes, [], False),
    "cityscapes+edges": ("cityscapes", make_cityscapes, ["data.instance_edges=true"], True),
}


def _sample(args: list[str], root: Path) -> dict:
    """`segldm.sample` in this process (the CLI's config, composed as Hydra composes it)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="sample", overrides=[f"paths.root_dir={root}", *args])
    return sample(cfg)


@pytest.mark.parametrize("name", list(CASES))
def test_preset_trains_three_steps_and_samples(name, tmp_path):
    option, write, overrides, edges = CASES[name]
    data_root = tmp_path / "data"
    write(data_root)
    run_train(
        [
            *SMALL,
            f"data={option}",
            f"data.root={data_root}",
            *overrides,
            "hydra.run.dir=${paths.output_root}/run",
        ],
        tmp_path,
    )
    ckpt = tmp_path / "outputs/run/checkpoints/last.ckpt"
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 3
    n_labels = checkpoint["segldm"]["config"]["data"]["n_labels"]
    assert checkpoint["state_dict"]["cond_stage_model.channel_mapper.weight"].shape[1] == n_labels + edges
    assert (tmp_path / "outputs/run/samples/step0000003.png").is_file()  # the grid carries the condition

    out = tmp_path / "samples"
    assert (
        _sample([f"ckpt={ckpt}", "masks=val", "num_samples=1", "steps=5", f"out_dir={out}"], tmp_path)[
            "count"
        ]
        == 1
    )
    images = sorted((out / "samples").glob("*.png"))
    assert len(images) == 1
    height, width = np.asarray(Image.open(images[0])).shape[:2]
    assert (width, height) == ((64, 32) if option == "cityscapes" else (32, 32))

    if edges and option == "cocostuff":  # masks from files: a label PNG and its instance PNG
        masks, instances = tmp_path / "masks", tmp_path / "instances"
        masks.mkdir()
        instances.mkdir()
        Image.fromarray(np.full((32, 64), 7, dtype=np.uint8)).save(masks / "a.png")
        split = np.zeros((32, 64), dtype=np.uint16)  # 16-bit, as gtFine instanceIds
        split[:, 32:] = 26001
        Image.fromarray(split).save(instances / "a.png")
        _sample(
            [
                f"ckpt={ckpt}",
                f"masks={masks}",
                f"instances={instances}",
                "resize=none",
                "steps=5",
                f"out_dir={out}2",
            ],
            tmp_path,
        )
        assert (out.parent / "samples2/samples/a.png").is_file()
        with pytest.raises(ConditionError, match="pass instances=<folder"):
            _sample([f"ckpt={ckpt}", f"masks={masks}", "resize=none", "steps=5", f"out_dir={out}3"], tmp_path)


@pytest.mark.parametrize(
    ("preset", "channels"),
    [("ade20k_256", 151), ("cocostuff_256", 183), ("cityscapes_512x256", 36), ("celebamask_hq_256", 19)],
)
def test_gpu_presets_compose_and_pass_the_start_up_checks(preset, channels, tmp_path):
    first_stage = tmp_path / "vq-f4.ckpt"
    first_stage.write_bytes(b"x")
    cfg = compose_train(
        [
            f"experiment={preset}",
            f"paths.output_root={tmp_path}",
            f"paths.output_dir={tmp_path}/run",
            f"model.first_stage.ckpt_path={first_stage}",
        ]
    )
    validate_config(cfg)
    assert cfg.model.cond_stage.in_channels == channels
    assert cfg.trainer.accelerator == "gpu" and cfg.model.unet.model_channels == 128
