"""safetensors weights-only files: written by segldm.convert, read wherever a weights file is.

A tiny random LDM is saved as a native ``.ckpt``; ``segldm.convert weights`` (and ``compvis`` /
``export`` with ``--format safetensors``) write it as safetensors, and every reader (load_ldm as
segldm.sample and segldm.eval use it, init_from, model.first_stage.ckpt_path) gets the same
tensors, kind, config and step. Files of the wrong model are refused naming the file, the keys and
the way out.
"""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from segldm.convert import convert_compvis, convert_weights, export_compvis
from segldm.convert import main as convert_main
from segldm.models.autoencoder import VQModel
from segldm.runtime.loading import build_ldm, init_from_checkpoint, ldm_checkpoint, load_ldm
from segldm.runtime.resume import check_resumable
from segldm.sample import load_model
from segldm.storage.checkpoint_files import CheckpointError, read_checkpoint, save_checkpoint
from segldm.storage.safetensors_files import looks_like_safetensors, save_safetensors_checkpoint
from tests.conftest import TINY_DATA, TINY_FIRST_STAGE, TINY_UNET, compose_train
from tests.unit.test_compat_compvis import randomize

st = pytest.importorskip("safetensors.torch")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(extra: list[str] | None = None) -> dict:
    cfg = compose_train([*TINY_DATA, *TINY_FIRST_STAGE, *TINY_UNET, *(extra or [])])
    return {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("safetensors")
    config = tiny_config()
    model = build_ldm(config["model"])
    randomize(model, 0)
    ckpt = save_checkpoint(ldm_checkpoint(model.state_dict(), config, global_step=7), folder / "ldm.ckpt")
    return {"folder": folder, "config": config, "model": model.eval(), "ckpt": ckpt}


def test_weights_command_keeps_tensors_kind_config_and_step(files):
    out = files["folder"] / "weights"
    assert convert_main(["weights", "--ckpt", str(files["ckpt"]), "--out", str(out)]) == 0
    path = out / "model.safetensors"
    assert looks_like_safetensors(path) and not looks_like_safetensors(files["ckpt"])
    original, written = read_checkpoint(files["ckpt"]), read_checkpoint(path)
    assert written.keys() == {"state_dict", "segldm", "global_step", "epoch"}
    assert written["global_step"] == 7
    assert written["segldm"] == json.loads(json.dumps(original["segldm"]))
    assert original["state_dict"].keys() == written["state_dict"].keys()
    for key, value in original["state_dict"].items():
        assert torch.equal(value, written["state_dict"][key]), key
    # what any safetensors user sees: plain tensors, the config as JSON metadata
    tensors = st.load_file(str(path))
    assert torch.equal(
        tensors["model.diffusion_model.out.2.weight"],
        original["state_dict"]["model.diffusion_model.out.2.weight"],
    )
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and json.loads(meta["segldm"])["kind"] == "ldm"
    assert (
        convert_main(["weights", "--ckpt", str(files["ckpt"]), "--out", str(out)]) == 2
    )  # exists: --overwrite


def test_safetensors_loads_for_sample_eval_and_init_from(files, tmp_path):
    path = convert_weights(files["ckpt"], tmp_path / "ldm.safetensors")
    expected = files["model"].state_dict()
    from_sample = load_model(
        path, None, False, torch.device("cpu")
    )  # segldm.sample ckpt= (and eval's loader)
    for key, value in load_ldm(path).state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert from_sample.segldm_config["model"]["unet"] == files["config"]["model"]["unet"]
    fresh = build_ldm(files["config"]["model"])
    init_from_checkpoint(fresh, path)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, expected[key]), key
    # the first stage of an LDM file, as model.first_stage.ckpt_path
    first = files["config"]["model"]["first_stage"]
    vq = VQModel(first["ddconfig"], first["n_embed"], first["embed_dim"], ckpt_path=path)
    for key, value in vq.state_dict().items():
        assert torch.equal(value, files["model"].first_stage_model.state_dict()[key]), key
    assert vq.loaded_from == str(path)


def test_compvis_and_export_write_safetensors_that_round_trip(files, tmp_path):
    exported = export_compvis(files["ckpt"], tmp_path / "compvis", format="safetensors")
    assert exported["ckpt"].name == "model.safetensors"
    assert set(st.load_file(str(exported["ckpt"]))) == set(files["model"].state_dict())
    back = convert_compvis(exported["config"], exported["ckpt"], tmp_path / "native", format="safetensors")
    assert back["ckpt"].name == "model.safetensors"
    config_text = back["config"].read_text()
    assert f"init_from: {back['ckpt']}" in config_text and "model.ckpt" not in config_text
    for key, value in load_ldm(back["ckpt"]).state_dict().items():
        assert torch.equal(value, files["model"].state_dict()[key]), key


def test_safetensors_of_the_wrong_model_are_named(files, tmp_path):
    first_stage = {f"vq.{k}": v for k, v in files["model"].first_stage_model.state_dict().items()}
    vq_path = save_safetensors_checkpoint(
        {"state_dict": first_stage, "segldm": {"kind": "autoencoder", "config": {}}},
        tmp_path / "vq.safetensors",
    )
    with pytest.raises(
        CheckpointError, match=r"expected a segldm LDM checkpoint, but this is a segldm first-stage"
    ) as info:
        load_ldm(vq_path)
    assert str(vq_path) in str(info.value) and "model.first_stage.ckpt_path" in str(info.value)
    # an LDM of other shapes: every bad key named, with the way out
    wider = tiny_config(["model.unet.model_channels=64"])
    with pytest.raises(
        CheckpointError, match=r"init_from needs the same architecture.*shape mismatch"
    ) as info:
        init_from_checkpoint(
            build_ldm(wider["model"]), convert_weights(files["ckpt"], tmp_path / "ldm.safetensors")
        )
    assert str(tmp_path / "ldm.safetensors") in str(info.value)
    tensors = st.load_file(str(tmp_path / "ldm.safetensors"))
    del tensors["model.diffusion_model.out.2.bias"]
    tensors["model.diffusion_model.extra"] = torch.zeros(1)
    broken = save_safetensors_checkpoint(
        {"state_dict": tensors, "segldm": read_checkpoint(files["ckpt"])["segldm"]},
        tmp_path / "broken.safetensors",
    )
    with pytest.raises(
        CheckpointError,
        match=r"1 missing key\(s\): model\.diffusion_model\.out\.2\.bias.*1 unexpected key\(s\): model\.diffusion_model\.extra",
    ):
        load_ldm(broken)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((tmp_path / "ldm.safetensors").read_bytes()[:4000])
    with pytest.raises(CheckpointError, match=str(truncated) + r".*not a readable safetensors file"):
        load_ldm(truncated)
    # a weights-only file cannot resume a run; it starts one
    with pytest.raises(CheckpointError, match=r"init_from=.*ldm\.safetensors"):
        check_resumable(read_checkpoint(tmp_path / "ldm.safetensors"), tmp_path / "ldm.safetensors", "ldm")


def test_weights_command_refuses_other_suffixes(files, tmp_path):
    assert convert_main(["weights", "--ckpt", str(files["ckpt"]), "--out", str(tmp_path / "x.ckpt")]) == 2
    assert not (tmp_path / "x.ckpt").exists()
