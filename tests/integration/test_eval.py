"""`python -m segldm.train_segmenter` and `python -m segldm.eval` end to end, and eval's error paths.

A tiny untrained LDM checkpoint is built in-process (the numbers are not the point here: that every
file, metric, tag and error is there); Inception weights are random of the right layout
(tests/unit/test_metrics_fid.py). The slow test trains the real segmenter on the built-in data and
checks it reaches the mIoU the issue asks for.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import Dataset

from segldm.evaluation.common import select_pairs
from segldm.metrics.fid import InceptionWeightsError
from segldm.metrics.segmenters.trained import SegmenterModule, SegNet, segmenter_checkpoint
from segldm.runtime.loading import build_ldm, ldm_checkpoint
from segldm.storage.checkpoint_files import CheckpointError, save_checkpoint
from tests.conftest import CONF, REPO, TINY_DATA, TINY_FIRST_STAGE, TINY_UNET, compose_train
from tests.unit.test_metrics_fid import make_random_inception

torch.set_num_threads(1)
EVAL_DATA = ["data.validation.length=3"]
TINY_SEGMENTER = [  # the real train_segmenter CLI for two steps at 32 px
    "model.channels=[4,4,4]",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "checkpoint_every_n_steps=2",
    "+trainer.enable_progress_bar=false",
]


def run(
    module: str, args: list[str], root: Path, check: bool = True, threads: int = 1, timeout: int = 600
) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` with every default path under `root`, `threads` intra-op threads;
    `timeout` only stops a hung process (CI machines differ several-fold in speed)."""
    env = {**os.environ, "SEGLDM_ROOT": str(root), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{module} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


class ImagesOnly(Dataset):
    """A validation set with images and no masks (what eval must refuse)."""

    n_labels = 8

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": torch.zeros(32, 32, 3)}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval_root")


@pytest.fixture(scope="module")
def ldm_ckpt(root: Path) -> Path:
    """An untrained tiny LDM saved as a native checkpoint, in a folder a 'training run' is tagged with."""
    cfg = compose_train([*TINY_DATA, *EVAL_DATA, *TINY_FIRST_STAGE, *TINY_UNET, f"paths.root_dir={root}"])
    config = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
    }
    torch.manual_seed(0)
    model = build_ldm(config["model"])
    path = root / "outputs" / "run" / "checkpoints" / "step0000003.ckpt"
    save_checkpoint(ldm_checkpoint(model.state_dict(), config, global_step=3), path)
    return path


@pytest.fixture(scope="module")
def inception(root: Path) -> Path:
    return make_random_inception(root / "random_inception.pth")


@pytest.fixture(scope="module")
def segmenter_run(root: Path) -> dict:
    """The real train_segmenter CLI for two steps at 32 px."""
    proc = run(
        "segldm.train_segmenter",
        [*TINY_DATA, *EVAL_DATA, *TINY_SEGMENTER],
        root,
    )
    return {"ckpt": root / "outputs" / "segmenters" / "synthetic" / "segmenter.ckpt", "stdout": proc.stdout}


def compose_eval(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="eval", overrides=overrides)


def test_train_segmenter_writes_a_segmenter_checkpoint_with_its_real_miou(
    root: Path, segmenter_run: dict
) -> None:
    ckpt = torch.load(segmenter_run["ckpt"], weights_only=True)
    assert ckpt["segldm"]["kind"] == "segmenter"
    assert ckpt["segldm"]["net"] == {"n_classes": 8, "channels": [4, 4, 4]}
    real = ckpt["segldm"]["real_scores"]
    assert 0.0 <= real["miou"] <= 1.0 and real["images"] == 3 and len(real["per_class"]) == 8
    assert "real-image mIoU" in segmenter_run["stdout"]
    report = json.loads((segmenter_run["ckpt"].parent / "report.json").read_text())
    assert report["real"]["miou"] == real["miou"]
    assert (segmenter_run["ckpt"].parent / "checkpoints" / "last.ckpt").is_file()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/outputs/mlflow.db")
    experiment = client.get_experiment_by_name("segmenters")
    (run_,) = client.search_runs([experiment.experiment_id])
    assert run_.data.metrics["real/miou"] == pytest.approx(real["miou"])
    assert run_.data.tags["segldm.last_checkpoint"] == str(segmenter_run["ckpt"])


def test_eval_end_to_end(root: Path, ldm_ckpt: Path, inception: Path, segmenter_run: dict) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root}/outputs/mlflow.db"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("tiny-training")
    training = client.create_run(experiment_id, tags={"segldm.checkpoint_dir": str(ldm_ckpt.parent)})
    client.set_terminated(training.info.run_id)  # tagged as segldm.train tags its runs

    out = root / "eval_out"
    args = [
        f"ckpt={ldm_ckpt}",
        "eval.steps=2",
        "eval.batch_size=2",
        f"eval.fid.weights_path={inception}",
        "eval.fid.batch_size=3",
        "+metrics.toy._target_=tests.toy_metric.Redness",  # a metric added in one class + this entry
        f"hydra.run.dir={out}",
    ]
    proc = run("segldm.eval", args, root)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("fid", "kid_mean", "miou", "pixel_accuracy", "miou_real", "pixel_accuracy_real"):
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
    assert metrics["num_samples"] == 3 and metrics["global_step"] == 3
    assert_metrics_are_of_the_generated_images(out, metrics, inception, segmenter_run["ckpt"], ldm_ckpt)
    # 3 samples, kid_subset_size 1000: one KID over all 3, no std, and the user was told before sampling
    assert metrics["sampler"]["steps"] == 2 and metrics["sampler"]["unet_evaluations_per_image"] == 2
    assert metrics["kid_subset_size"] == 3 and metrics["kid_std"] is None
    assert isinstance(metrics["first_stage_rfid"], float) and "first stage's rFID at this N" in proc.stdout
    assert "KID is computed once over all 3 images" in proc.stdout
    assert metrics["fid_backend"]["weights"]["path"] == str(inception)
    # reference points and uncertainty: bootstrap intervals of FID and mIoU; with 3 images precision/recall
    # (k = 3 neighbours) and the real-halves FID (>= 4 images) cannot be computed and are reported empty
    boot = metrics["bootstrap"]
    assert boot["draws"] == 1000
    assert (
        boot["fid"][0] <= metrics["fid"] <= boot["fid"][1]
        and boot["miou"][0] <= metrics["miou"] <= boot["miou"][1]
    )
    assert metrics.get("precision") is None and metrics["real_halves_fid"] is None
    report = (out / "report.md").read_text()
    assert (
        "95 % bootstrap interval" in report and "two real halves" in report and "precision / recall" in report
    )
    assert metrics["segmenter"]["real_miou_at_training"] is not None
    assert len(metrics["per_class"]) == 8
    for sub in ("generated", "real", "masks"):
        assert sorted(p.name for p in (out / sub).iterdir()) == [f"val_0000{i}.png" for i in range(3)]
    assert (out / "grid.png").is_file() and "| mIoU |" in (out / "report.md").read_text()
    assert "mIoU" in proc.stdout and "FID" in proc.stdout

    runs = client.search_runs([experiment_id], filter_string="tags.`segldm.task` = 'eval'")
    assert len(runs) == 1, "the eval run goes into the training run's experiment"
    tags = runs[0].data.tags
    assert tags["segldm.source_checkpoint"] == str(ldm_ckpt.resolve())
    assert tags["segldm.source_run_id"] == training.info.run_id and tags["segldm.source_step"] == "3"
    assert runs[0].data.metrics["miou"] == pytest.approx(metrics["miou"])
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"metrics.json", "report.md", "report.html", "grid.png"} <= artifacts
    assert "data:image/png;base64," in (out / "report.html").read_text()  # the grid, inside the page
    assert client.get_run(training.info.run_id).data.metrics["eval/miou"] == pytest.approx(metrics["miou"])
    # the added metric: value, bootstrap interval, direction, card, report line, both MLflow runs
    generated = [np.asarray(Image.open(out / "generated" / f"val_0000{i}.png")) for i in range(3)]
    redness = np.mean([(g[..., 0].astype(float) - g[..., 1]).mean() / 255 for g in generated])
    assert metrics["redness"] == pytest.approx(redness, rel=1e-12)
    assert boot["redness"][0] <= metrics["redness"] <= boot["redness"][1]
    assert metrics["directions"]["redness"] == "maximize"
    assert metrics["protocol_card"]["metrics"]["toy"]["implementation"] == "tests/toy_metric.py"
    assert "| redness |" in report and "redness" in proc.stdout
    assert runs[0].data.metrics["redness"] == pytest.approx(metrics["redness"])
    assert client.get_run(training.info.run_id).data.metrics["eval/redness"] == pytest.approx(
        metrics["redness"]
    )
    # the protocol card: no protocol here, every metric's implementation and weights named, in MLflow too
    card = metrics["protocol_card"]
    assert card["protocol"] is None and card["num_samples"] == 3 and card["seed_range"] == [0, 2]
    assert card["metrics"]["inception"]["weights"]["sha256"] == metrics["fid_backend"]["weights"]["sha256"]
    assert card["metrics"]["segmentation"]["segmenter"]["weights_sha256"]
    assert runs[0].data.tags["segldm.card_key"] == card["card_key"]
    assert runs[0].data.params["card.num_samples"] == "3"


def assert_metrics_are_of_the_generated_images(
    out: Path, metrics: dict, inception: Path, segmenter_ckpt: Path, ldm_ckpt: Path
) -> None:
    """FID and mIoU recomputed here from the PNGs eval wrote: FID is generated vs real (real vs real
    would be ~0), mIoU is the segmenter's on generated/ and mIoU_real on real/ (swapped or both real,
    the values would not match: this segmenter scores the two sets differently), first_stage_miou
    the segmenter's on the LDM's first-stage reconstructions of real/."""
    from segldm.metrics.fid import InceptionFeatures, InceptionWeights, fid_kid, read_folder_images
    from segldm.metrics.reconstruction import reconstruct
    from segldm.metrics.segmenters import segment_scores
    from segldm.metrics.segmenters.trained import TrainedSegmenter
    from segldm.runtime.loading import load_ldm

    generated, real = read_folder_images(out / "generated"), read_folder_images(out / "real")
    for fake_image, real_image in zip(generated, real, strict=True):
        assert np.abs(fake_image.astype(np.int16) - real_image.astype(np.int16)).mean() > 10
    datamodule = instantiate(compose_train([*TINY_DATA, *EVAL_DATA]).data)
    pairs = select_pairs(datamodule.val_dataset, None, need_images=True)
    assert all(np.array_equal(p.image, image) for p, image in zip(pairs, real, strict=True))

    extractor = InceptionFeatures(InceptionWeights(inception, "test"), batch_size=3)
    fake_features, real_features = extractor(generated), extractor(real)
    assert metrics["fid"] == pytest.approx(fid_kid(fake_features, real_features)["fid"], rel=1e-6)
    assert abs(fid_kid(real_features, real_features)["fid"]) < 1e-3 < 1.0 < metrics["fid"]

    segmenter = TrainedSegmenter(segmenter_ckpt)
    labels = [p.labels for p in pairs]
    on_generated = segment_scores(
        segmenter, generated, labels, datamodule.n_labels, datamodule.ignore_label
    ).miou
    on_real = segment_scores(segmenter, real, labels, datamodule.n_labels, datamodule.ignore_label).miou
    assert on_generated != on_real, (
        "the two image sets score alike here: the check below cannot tell them apart"
    )
    assert metrics["miou"] == pytest.approx(on_generated, rel=1e-9, abs=1e-12)
    assert metrics["miou_real"] == pytest.approx(on_real, rel=1e-9, abs=1e-12)
    first_stage = load_ldm(ldm_ckpt).first_stage_model
    reconstructed = reconstruct(first_stage, real, metrics["sampler"]["batch_size"], torch.device("cpu"))
    on_reconstructed = segment_scores(
        segmenter, reconstructed, labels, datamodule.n_labels, datamodule.ignore_label
    )
    assert metrics["first_stage_miou"] == pytest.approx(on_reconstructed.miou, rel=1e-9, abs=1e-12)


def test_generated_images_do_not_depend_on_batch_size_or_num_samples(root: Path, ldm_ckpt: Path) -> None:
    from segldm.pipeline.generation import SamplingSettings, generate
    from segldm.runtime.loading import load_ldm

    model = load_ldm(ldm_ckpt)
    cfg = compose_train([*TINY_DATA, *EVAL_DATA])
    dataset = instantiate(cfg.data).val_dataset
    pairs = select_pairs(dataset, None, need_images=True)
    seeds = [5 + p.index for p in pairs]
    masks = [p.labels for p in pairs]
    together = generate(model, masks, seeds, SamplingSettings(steps=2, eta=1.0, batch_size=3)).uint8()
    settings = SamplingSettings(steps=2, eta=1.0, batch_size=1)
    alone = generate(model, masks[1:], seeds[1:], settings).uint8()  # num_samples=... would drop the first
    # Each image comes from its own generator, so batch size changes no random number; but the CPU
    # kernels may pick another reduction order for another batch size (oneDNN blocks by batch),
    # which moves the float images by rounding (~1e-6): a pixel on a .5 boundary of the uint8
    # conversion may round the other way. That much, and no more, is allowed.
    for a, b in zip(together[1:], alone, strict=True):
        diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    assert np.abs(together[0].astype(np.int16) - together[1].astype(np.int16)).max() > 8


def eval_overrides(root: Path, ckpt: Path, segmenter: Path, inception: Path, *extra: str) -> list[str]:
    return [
        f"ckpt={ckpt}",
        f"paths.root_dir={root}",
        f"paths.output_dir={root / 'errors'}",
        "logger=none",
        f"segmenter.ckpt={segmenter}",
        f"eval.fid.weights_path={inception}",
        "eval.steps=1",
        *extra,
    ]


def test_bad_inputs_fail_before_sampling(
    root: Path, ldm_ckpt: Path, inception: Path, segmenter_run: dict
) -> None:
    from segldm.evaluation.ldm import evaluate

    seg = segmenter_run["ckpt"]
    with pytest.raises(
        CheckpointError, match="expected a segldm LDM checkpoint, but this is a segldm segmenter"
    ):
        evaluate(compose_eval(eval_overrides(root, seg, seg, inception)))
    with pytest.raises(
        CheckpointError, match="expected a segldm segmenter checkpoint.*but this is a segldm LDM"
    ):
        evaluate(compose_eval(eval_overrides(root, ldm_ckpt, ldm_ckpt, inception)))
    with pytest.raises(InceptionWeightsError, match=r"eval.fid.weights_path=.*absent.pth: no such file"):
        evaluate(compose_eval(eval_overrides(root, ldm_ckpt, seg, root / "absent.pth")))
    with pytest.raises(ValueError, match=r"eval.num_samples=50, but the validation split has 3 samples"):
        evaluate(compose_eval(eval_overrides(root, ldm_ckpt, seg, inception, "eval.num_samples=50")))
    with pytest.raises(ValueError, match=r"eval.steps=36: .*t=1000 after CompVis's \+1 shift.* 35 or 38"):
        evaluate(compose_eval(eval_overrides(root, ldm_ckpt, seg, inception, "eval.steps=36")))
    with pytest.raises(FileNotFoundError, match="python -m segldm.train_segmenter"):
        evaluate(compose_eval(eval_overrides(root, ldm_ckpt, root / "no_segmenter.ckpt", inception)))
    cfg = compose_eval(eval_overrides(root, ldm_ckpt, seg, inception, "data=synthetic", *TINY_DATA))
    cfg.data.validation = {"_target_": f"{__name__}.ImagesOnly"}
    with pytest.raises(ValueError, match="ImagesOnly\\[0\\] has no mask"):
        evaluate(cfg)
    five = root / "segmenter_5_classes.ckpt"
    save_checkpoint(segmenter_checkpoint(SegmenterModule(SegNet(5, (4, 4, 4))), {}), five)
    with pytest.raises(ValueError, match="predicts 5 classes but the data has data.n_labels=8"):
        evaluate(compose_eval(eval_overrides(root, ldm_ckpt, five, inception)))
    assert not (root / "errors" / "generated").exists()


@pytest.mark.slow
@pytest.mark.timeout(2700)
def test_trained_segmenter_reaches_the_required_real_miou_on_the_built_in_data(tmp_path: Path) -> None:
    """The default `make train-segmenter` config (64 px, 8 classes): real-image mIoU >= 0.99 (~2 min on 2 cores)."""
    args = ["logger=none", "+trainer.enable_progress_bar=false"]
    run("segldm.train_segmenter", args, tmp_path, threads=2, timeout=2400)
    ckpt = torch.load(tmp_path / "outputs" / "segmenters" / "synthetic" / "segmenter.ckpt", weights_only=True)
    assert ckpt["segldm"]["real_scores"]["miou"] >= 0.99


@pytest.mark.parametrize(
    ("option", "target"),
    [
        ("trained", "segldm.metrics.segmenters.trained.TrainedSegmenter"),
        ("deeplabv2_cocostuff", "segldm.metrics.segmenters.deeplabv2.DeepLabV2Segmenter"),
    ],
)
def test_eval_config_composes_each_segmenter_and_requires_ckpt(option: str, target: str) -> None:
    from omegaconf.errors import MissingMandatoryValue

    cfg = compose_eval([f"segmenter={option}", "paths.output_dir=/tmp/x"])
    assert cfg.segmenter._target_ == target and cfg.get("data") is None
    assert cfg.eval.fid.backend == "auto" and cfg.logger.mlflow.experiment_name is None
    with pytest.raises(MissingMandatoryValue, match="ckpt"):
        _ = cfg.ckpt
    assert compose_eval(["ckpt=x", "data=synthetic", "paths.output_dir=/tmp/x"]).data.n_labels == 8


@pytest.fixture(scope="module")
def autoencoder_ckpt(root: Path) -> Path:
    """An untrained tiny first stage saved as segldm.train writes one (vq.* keys, its config, kind)."""
    cfg = compose_train(
        ["model=autoencoder", *TINY_DATA, *EVAL_DATA, *TINY_FIRST_STAGE, f"paths.root_dir={root}"]
    )
    torch.manual_seed(0)
    vq = instantiate(cfg.model.first_stage)
    config = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
    }
    path = root / "outputs" / "ae_run" / "checkpoints" / "step0000005.ckpt"
    state = {f"vq.{k}": v for k, v in vq.state_dict().items()}
    save_checkpoint(
        {"state_dict": state, "global_step": 5, "segldm": {"kind": "autoencoder", "config": config}}, path
    )
    return path


def test_first_stage_checkpoint_is_scored_on_its_reconstructions(
    root: Path, autoencoder_ckpt: Path, inception: Path, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    from segldm.metrics.reconstruction import l1_error, psnr

    client = MlflowClient(f"sqlite:///{root}/outputs/mlflow.db")
    experiment_id = client.create_experiment("tiny-first-stage")
    training = client.create_run(experiment_id, tags={"segldm.checkpoint_dir": str(autoencoder_ckpt.parent)})
    client.set_terminated(training.info.run_id)
    vgg = tmp_path / "vgg16.pth"
    torch.save(__import__("torchvision").models.vgg16(weights=None).state_dict(), vgg)
    out = tmp_path / "rfid"
    args = [
        f"ckpt={autoencoder_ckpt}",
        f"eval.fid.weights_path={inception}",
        f"eval.lpips_vgg16_path={vgg}",
        f"hydra.run.dir={out}",
    ]
    proc = run("segldm.eval", args, root)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kind"] == "first_stage" and metrics["num_samples"] == 3 and metrics["global_step"] == 5
    for key in ("rfid", "l1", "psnr", "lpips"):
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
    names = [f"val_0000{i}.png" for i in range(3)]
    assert sorted(p.name for p in (out / "reconstructed").iterdir()) == names
    real = [np.asarray(Image.open(out / "real" / n)) for n in names]
    reconstructed = [np.asarray(Image.open(out / "reconstructed" / n)) for n in names]
    assert metrics["l1"] == pytest.approx(l1_error(real, reconstructed)) and metrics["l1"] > 0
    assert metrics["psnr"] == pytest.approx(psnr(real, reconstructed))
    assert "rFID" in proc.stdout and (out / "report.md").is_file() and (out / "grid.png").is_file()
    source = client.get_run(training.info.run_id).data.metrics
    assert source["eval/rfid"] == pytest.approx(metrics["rfid"]) and source["eval/psnr"] == pytest.approx(
        metrics["psnr"]
    )


def test_reconstruction_metrics_are_their_closed_forms() -> None:
    from segldm.metrics.reconstruction import l1_error, psnr

    a = [np.zeros((2, 2, 3), np.uint8), np.full((2, 2, 3), 100, np.uint8)]
    b = [np.full((2, 2, 3), 10, np.uint8), np.full((2, 2, 3), 100, np.uint8)]
    assert l1_error(a, b) == pytest.approx(5 / 127.5)  # mean |diff| 10 over half the pixels
    assert psnr(a, b) == pytest.approx((10 * np.log10(255**2 / 100) + 100) / 2)  # identical image: 100 dB


@pytest.mark.slow
def test_pytorch_fid_implementation_equals_its_own_command_on_the_written_folders(
    root: Path, ldm_ckpt: Path, segmenter_run: dict, tmp_path: Path
) -> None:
    """eval.fid.implementation=pytorch-fid (the OASIS/SDM protocols' FID): the FID in metrics.json is what
    `python -m pytorch_fid generated/ real/` prints on the folders eval wrote (random weights of the
    package's layout in a TORCH_HOME, where the command finds them offline)."""
    import re

    from tests.unit.test_pytorch_fid import PYTORCH_FID_FILE, start_pytorch_fid_command

    home = tmp_path / "torch_home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    weights = make_random_inception(home / "hub" / "checkpoints" / PYTORCH_FID_FILE)  # the same layout
    out = tmp_path / "eval_pytorch_fid"
    args = [
        f"ckpt={ldm_ckpt}",
        "logger=none",
        "eval.steps=2",
        "eval.fid.implementation=pytorch-fid",
        f"eval.fid.weights_path={weights}",
        "metrics.inception.first_stage_rfid=false",
        f"segmenter.ckpt={segmenter_run['ckpt']}",
        "eval.bootstrap.draws=10",
        f"hydra.run.dir={out}",
    ]
    run("segldm.eval", args, root)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol_card"]["metrics"]["inception"]["implementation"] == "pytorch-fid"
    command = start_pytorch_fid_command(home, str(out / "generated"), str(out / "real"))
    stdout, stderr = command.communicate(timeout=300)
    assert command.returncode == 0, stderr[-2000:]
    reference = float(re.search(r"FID:\s+(\S+)", stdout).group(1))
    assert reference > 1.0 and metrics["fid"] == pytest.approx(reference, rel=1e-6)
