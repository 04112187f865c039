"""Both stages through the real `python -m segldm.train`, read back from MLflow in this process."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import TINY_DATA, TINY_FIRST_STAGE, TINY_TRAINER, TINY_UNET, run_train
from tests.resume_helpers import assert_process_resumed_from, now_ms

AUTOENCODER = [
    "model=autoencoder",
    *TINY_FIRST_STAGE,
    *TINY_DATA,
    *TINY_TRAINER,
    "model.optimization.base_learning_rate=1e-3",
    "model.optimization.scale_lr=false",
    "scheduler=constant",
    "hydra.run.dir=${paths.output_root}/ae",
]


def ldm_args(first_stage_ckpt: Path) -> list[str]:
    return [
        "model=ldm_seg",
        *TINY_FIRST_STAGE,
        *TINY_UNET,
        *TINY_DATA,
        *TINY_TRAINER,
        f"model.first_stage.ckpt_path={first_stage_ckpt}",
        "model.optimization.base_learning_rate=1e-4",
        "scheduler.warm_up_steps=[2]",
        "callbacks.sample_grid.every_n_steps=2",
        "hydra.run.dir=${paths.output_root}/ldm",
        "run_name=e2e-ldm",
    ]


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    ae = run_train(AUTOENCODER, root)
    first_stage = root / "outputs/ae/checkpoints/last.ckpt"
    assert first_stage.is_file(), ae.stdout
    ldm = run_train(ldm_args(first_stage), root)
    return root, ae, ldm


def test_first_stage_checkpoint_is_an_autoencoder(two_stage_run):
    root, _, _ = two_stage_run
    ckpt = torch.load(root / "outputs/ae/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["segldm"]["kind"] == "autoencoder"
    assert ckpt["global_step"] == 4
    assert any(k.startswith("vq.encoder.") for k in ckpt["state_dict"])
    assert (root / "outputs/ae/reconstructions/step0000004.png").is_file()


def test_ldm_loads_frozen_first_stage_and_saves_compvis_layout(two_stage_run):
    root, _, ldm = two_stage_run
    ckpt = torch.load(root / "outputs/ldm/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    ae = torch.load(root / "outputs/ae/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    sd = ckpt["state_dict"]
    assert ckpt["segldm"]["kind"] == "ldm" and ckpt["global_step"] == 4
    # the first stage stayed frozen: identical to the stage-1 weights
    for key, value in ae["state_dict"].items():
        assert torch.equal(sd["first_stage_model." + key.removeprefix("vq.")], value), key
    assert "model_ema.num_updates" in sd and sd["model_ema.num_updates"].dtype == torch.int32
    assert int(sd["model_ema.num_updates"]) == 4
    assert "cond_stage_model.channel_mapper.weight" in sd and "betas" in sd
    assert ckpt["segldm"]["config"]["model"]["unet"]["in_channels"] == 6
    grids = sorted((root / "outputs/ldm/samples").glob("*.png"))
    assert [g.name for g in grids] == ["step0000002.png", "step0000004.png"]
    assert "MLflow run:" in ldm.stdout and "mlflow ui --backend-store-uri sqlite:///" in ldm.stdout


def test_mlflow_run_read_back_from_another_process(two_stage_run):
    root, _, _ = two_stage_run
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/outputs/mlflow.db")
    experiment = client.get_experiment_by_name("segldm")
    runs = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'e2e-ldm'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["model/unet/model_channels"] == "32"
    assert run.data.params["model/diffusion/timesteps"] == "1000"
    assert float(run.data.params["effective_learning_rate"]) == pytest.approx(
        1e-4 * 4
    )  # base x batch (scale_lr)
    assert "model.first_stage.ckpt_path=" in run.data.tags["segldm.overrides"]
    assert len(run.data.tags["mlflow.source.git.commit"]) >= 7
    assert run.data.tags["segldm.last_checkpoint"].endswith("ldm/checkpoints/last.ckpt")
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [0, 1, 2, 3]
    assert all(math.isfinite(m.value) for m in losses)  # finite (no NaN, no inf), logged per step
    assert len(client.get_metric_history(run.info.run_id, "lr-AdamW")) == 4
    assert client.get_metric_history(run.info.run_id, "val/loss")
    assert client.get_metric_history(run.info.run_id, "val/loss_ema")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "samples"} <= artifacts
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert "samples/step0000004.png" in samples
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]  # log_image: the step slider
    assert any(p.startswith("images/samples+step+4+") and p.endswith(".png") for p in images), images
    config_yaml = Path(client.download_artifacts(run.info.run_id, "config/config.yaml", str(root)))
    assert "in_channels: 6" in config_yaml.read_text()


def test_resume_with_ckpt_path_continues_the_step_count(two_stage_run):
    """ckpt_path=<the 4-step run's last.ckpt>, max_steps=6: the new process trains steps 4 and 5 only
    (a restart from step 0 would end at step 6 too, bit-identical; it would log steps 0-5)."""
    root, _, _ = two_stage_run
    last = root / "outputs/ldm/checkpoints/last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 4
    args = [
        a
        for a in ldm_args(root / "outputs/ae/checkpoints/last.ckpt")
        if not a.startswith(("trainer.max_steps", "hydra.run.dir", "run_name"))
    ]
    started = now_ms()
    proc = run_train(
        [*args, "trainer.max_steps=6", f"ckpt_path={last}", "hydra.run.dir=${paths.output_root}/resumed"],
        root,
    )
    resumed = torch.load(
        root / "outputs/resumed/checkpoints/last.ckpt", map_location="cpu", weights_only=False
    )
    assert resumed["global_step"] == 6
    assert int(resumed["state_dict"]["model_ema.num_updates"]) == 6
    (run_id,) = re.findall(r"^MLflow run:\s+(\S+) ", proc.stdout, re.MULTILINE)
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/outputs/mlflow.db")
    assert_process_resumed_from(client, run_id, checkpoint, since_ms=started, last_step=5)


def test_fast_dev_run_of_both_stages(tmp_path):
    run_train([*AUTOENCODER, "trainer=debug", "logger=none"], tmp_path)
    # fast_dev_run writes no checkpoint: the LDM smoke run uses an untrained first stage on purpose
    run_train(
        [
            *ldm_args(Path("unused")),
            "trainer=debug",
            "logger=none",
            "model.first_stage.ckpt_path=null",
            "model.require_pretrained_first_stage=false",
        ],
        tmp_path,
    )


def test_missing_first_stage_checkpoint_names_path_and_remedy(tmp_path):
    proc = run_train(ldm_args(tmp_path / "no/such.ckpt"), tmp_path, check=False)
    assert proc.returncode != 0
    assert f"{tmp_path}/no/such.ckpt does not exist" in proc.stderr
    assert "python -m segldm.train model=autoencoder" in proc.stderr


def test_unreachable_tracking_server_fails_before_training(tmp_path):
    proc = run_train([*AUTOENCODER, "logger.mlflow.tracking_uri=http://127.0.0.1:9"], tmp_path, check=False)
    assert proc.returncode != 0
    assert "http://127.0.0.1:9 is unreachable" in proc.stderr
    assert not (tmp_path / "outputs/ae/checkpoints").exists()
