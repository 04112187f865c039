"""logger=csv|tensorboard|wandb beside mlflow: scalars, params and sample grids (with their step)
reach each, read back from the files each one writes; a missing optional package fails at start-up."""

from __future__ import annotations

import csv
import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from segldm.tracking.logger import LoggerPackageError, build_loggers, sweep_logger_note
from tests.conftest import TINY_DATA, TINY_FIRST_STAGE, TINY_TRAINER, compose_train, run_train

# the cheapest run with a sample grid: the first stage, 2 steps, its reconstructions grid at step 2
AUTOENCODER = [
    "model=autoencoder",
    *TINY_FIRST_STAGE,
    *TINY_DATA,
    *TINY_TRAINER,
    "trainer.max_steps=2",
    "callbacks.sample_grid.every_n_steps=2",
    "model.optimization.base_learning_rate=1e-3",
    "model.optimization.scale_lr=false",
    "scheduler=constant",
]
ALL = "logger=[csv,tensorboard,wandb]"  # MLflow: tests/integration/test_train_e2e.py


@pytest.fixture(scope="module")
def every_logger(tmp_path_factory) -> Path:
    """One training run into the three loggers at once, without MLflow (its bookkeeping must not be needed)."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("loggers")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")  # inherited by the training process: no network, files only
        proc = run_train([*AUTOENCODER, ALL, "hydra.run.dir=${paths.output_root}/all"], root)
    out = root / "outputs/all"
    assert (out / "checkpoints/last.ckpt").is_file() and (out / "reconstructions/step0000002.png").is_file()
    assert not (root / "outputs/mlflow.db").exists() and "MLflow run:" not in proc.stdout
    return out


def test_csv_gets_scalars_params_and_the_grid_path(every_logger: Path):
    (version,) = sorted((every_logger / "csv").iterdir())
    rows = list(csv.DictReader((version / "metrics.csv").open()))
    losses = [r for r in rows if r.get("train/loss")]
    assert [int(r["step"]) for r in losses] == [0, 1]
    hparams = yaml.safe_load((version / "hparams.yaml").read_text())
    assert hparams["model"]["optimization"]["optimizer"]["_target_"] == "torch.optim.Adam"
    (image,) = list(csv.DictReader((version / "images.csv").open()))
    assert image["step"] == "2" and image["key"] == "reconstructions"
    assert Path(image["path"]) == every_logger / "reconstructions/step0000002.png"


def test_tensorboard_gets_scalars_params_and_the_grid_at_its_step(every_logger: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (version,) = sorted((every_logger / "tensorboard").iterdir())
    events = EventAccumulator(str(version), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [0, 1]
    (grid,) = events.Images("reconstructions")
    assert grid.step == 2 and grid.width > 0 and grid.encoded_image_string.startswith(b"\x89PNG")
    hparams = yaml.safe_load((version / "hparams.yaml").read_text())
    assert hparams["model"]["image_key"] == "image"
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")  # the HParams tab


def wandb_records(path: Path) -> list[Any]:
    """The records of an offline run's ``run-<id>.wandb`` (wandb >= 0.30 writes config and history
    only there until `wandb sync`): a 7-byte header, then LevelDB-log blocks of 32 KiB whose chunks
    (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last) carry protobuf ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    data, position, block = path.read_bytes(), 7, 32768
    payloads, partial = [], b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk, position = data[position + 7 : position + 7 + length], position + 7 + length
        if kind in (1, 4):
            payloads.append(partial + chunk if kind == 4 else chunk)
        elif kind in (2, 3):
            partial = chunk if kind == 2 else partial + chunk
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def test_wandb_offline_gets_scalars_params_and_the_grid(every_logger: Path):
    (run,) = sorted((every_logger / "wandb").glob("offline-run-*"))
    records = wandb_records(next(run.glob("run-*.wandb")))
    config = {
        u.key: json.loads(u.value_json) for r in records if r.HasField("config") for u in r.config.update
    }
    assert config["model"]["optimization"]["optimizer"]["betas"] == [0.5, 0.9]
    history = [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.HasField("history")
    ]
    assert [h["trainer/global_step"] for h in history if "train/loss" in h] == [0, 1]
    (grid,) = [h for h in history if "reconstructions/_type" in h]
    assert grid["reconstructions/_type"] == "images/separated" and grid["trainer/global_step"] == 2
    (png,) = grid["reconstructions/filenames"]
    assert (run / "files" / png).stat().st_size > 0


@pytest.mark.parametrize(
    ("option", "module", "extra"),
    [("wandb", "wandb", "wandb"), ("tensorboard", "tensorboard", "tensorboard")],
)
def test_a_logger_whose_package_is_missing_names_the_extra(monkeypatch, tmp_path, option, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    cfg = compose_train([f"logger={option}", f"paths.output_dir={tmp_path}"])
    with pytest.raises(LoggerPackageError, match=rf"pip install 'segldm\[{extra}\]'"):
        build_loggers(cfg)


def test_a_sweep_without_mlflow_says_what_it_loses():
    assert sweep_logger_note(compose_train(["logger=mlflow"])) is None
    note = sweep_logger_note(compose_train(["logger=[csv,tensorboard]"]))
    assert note and "logger=[mlflow,csv,tensorboard]" in note and "marker files" in note
