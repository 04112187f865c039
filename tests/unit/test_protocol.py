"""Evaluation protocols: the presets compose, what breaks comparability is refused before sampling,
deviations are recorded, the card's key ignores file locations, published rows are well-formed."""

from __future__ import annotations

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from segldm.evaluation.protocol import ProtocolError, card_key, check_protocol, dataset_name, protocol_card
from segldm.evaluation.published import all_rows, published_rows
from tests.conftest import CONF

PROTOCOLS = sorted(p.stem for p in (CONF / "eval" / "protocol").glob("*.yaml") if p.stem != "none")
DATASETS = {p.stem for p in (CONF / "data").glob("*.yaml")}
SEGMENTERS = {p.stem for p in (CONF / "segmenter").glob("*.yaml")}


def protocol(name: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["ckpt=x", f"eval/protocol={name}"])
    return OmegaConf.to_container(cfg.eval.protocol, resolve=True)


def check(spec: dict, dataset: str = "ade20k", **kwargs):
    settings = spec["datasets"][dataset] if spec.get("datasets") and dataset in spec["datasets"] else {}
    args = {
        "fid_implementation": spec.get("fid_implementation"),
        "image_format": "png",
        "segmenter_choice": settings.get("segmenter"),
        "num_samples": settings.get("num_samples") or 10,
        "split_size": settings.get("num_samples") or 10,
        "resolution": settings.get("size") or [256, 256],
        "strict": True,
    } | kwargs
    return check_protocol(spec, dataset, **args)


@pytest.mark.parametrize("name", PROTOCOLS)
def test_presets_compose_and_name_what_exists(name: str) -> None:
    spec = protocol(name)
    assert spec["name"] == name and spec["fid_implementation"] in ("pytorch-fid", "torch-fidelity")
    assert spec["image_format"] == "png" and spec["datasets"]
    for dataset, settings in spec["datasets"].items():
        assert dataset in DATASETS, f"{name}: {dataset} is not a conf/data preset"
        if settings.get("segmenter") is not None:
            assert settings["segmenter"] in SEGMENTERS, (
                f"{name}/{dataset}: no conf/segmenter/{settings['segmenter']}.yaml"
            )
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["ckpt=x", f"eval/protocol={name}"])
    assert cfg.metrics.inception.implementation == spec["fid_implementation"]  # the protocol sets it


def test_no_protocol_is_torch_fidelity_and_compares_with_nothing() -> None:
    spec = protocol("none")
    assert spec["name"] is None and spec["fid_implementation"] == "torch-fidelity"
    plan = check_protocol(
        spec,
        "synthetic",
        fid_implementation="torch-fidelity",
        image_format="jpg",
        segmenter_choice="trained",
        num_samples=3,
        split_size=3,
        resolution=[32, 32],
        strict=True,
    )
    assert plan.name is None and not plan.comparable and not plan.deviations


def test_what_breaks_comparability_is_refused() -> None:
    oasis = protocol("oasis")
    with pytest.raises(
        ProtocolError, match=r"eval/protocol=oasis defines ade20k, cityscapes, cocostuff.*\(synthetic\)"
    ):
        check(oasis, "synthetic")
    with pytest.raises(
        ProtocolError, match=r"eval.image_format=jpg under eval/protocol=oasis.*PNG.*eval.image_format=png"
    ):
        check(oasis, image_format="jpg")
    with pytest.raises(
        ProtocolError, match=r"computes FID with pytorch-fid, but eval.fid.implementation=torch-fidelity"
    ):
        check(oasis, fid_implementation="torch-fidelity")
    with pytest.raises(
        ProtocolError, match=r"scores ade20k with segmenter=upernet101_ade20k, not segmenter=trained"
    ):
        check(oasis, segmenter_choice="trained")
    with pytest.raises(
        ProtocolError, match=r"N=100 generated images, the protocol's is 2000.*eval.strict_protocol=false"
    ):
        check(oasis, num_samples=100, split_size=2000)
    with pytest.raises(ProtocolError, match=r"resolution \[64, 64\] \(HxW\), the protocol's is \[256, 256\]"):
        check(oasis, resolution=[64, 64])
    with pytest.raises(ProtocolError, match="eval.image_format='webp'"):
        check(oasis, image_format="webp")


def test_deviations_are_recorded_when_not_strict_and_the_card_says_so() -> None:
    oasis = protocol("oasis")
    exact = check(oasis)
    assert exact.comparable and exact.settings["num_samples"] == 2000
    plan = check(oasis, num_samples=8, resolution=[32, 32], strict=False)
    assert not plan.comparable and len(plan.deviations) == 2
    card = protocol_card(
        plan,
        {"fid": {"weights": {"path": "/a/w.pth", "sha256": "abc"}}},
        num_samples=8,
        resolution=[32, 32],
        image_format="png",
        sampler={"name": "ddim", "steps": 2},
        seeds=[5, 6, 12],
    )
    assert card["protocol"] == "oasis" and card["comparable"] is False and card["seed_range"] == [5, 12]
    assert card["protocol_source"]["code"].startswith("boschresearch/OASIS@")
    # the same weights elsewhere are the same card; other weights, N or sampler-independent settings are not
    moved = protocol_card(
        plan,
        {"fid": {"weights": {"path": "/b/w.pth", "sha256": "abc"}}},
        num_samples=8,
        resolution=[32, 32],
        image_format="png",
        sampler={"name": "dpm_solver++", "steps": 20},
        seeds=[0],
    )
    assert moved["card_key"] == card["card_key"] == card_key(card)
    other = protocol_card(
        plan,
        {"fid": {"weights": {"path": "/a/w.pth", "sha256": "abd"}}},
        num_samples=8,
        resolution=[32, 32],
        image_format="png",
        sampler={},
        seeds=[0],
    )
    assert other["card_key"] != card["card_key"]


def test_sdm_pre_resize_is_a_deviation() -> None:
    sdm = protocol("sdm")
    with pytest.raises(ProtocolError, match="resized every image first"):
        check(sdm)


def test_data_presets_name_their_dataset() -> None:
    for name in ("ade20k", "cocostuff", "cityscapes", "celebamask_hq", "sflckr", "synthetic", "folder"):
        data = yaml.safe_load((CONF / "data" / f"{name}.yaml").read_text())
        assert dataset_name(data) == name


def test_published_rows_have_sources_and_known_protocols() -> None:
    rows = all_rows()
    assert rows, "segldm/evaluation/published_results.yaml is empty"
    for row in rows:
        assert row["protocol"] in {*PROTOCOLS, "own"}, row
        assert row["dataset"] in DATASETS, row
        assert row.get("fid") is not None or row.get("miou") is not None, row
    assert all(
        r["protocol"] == "oasis" and r["dataset"] == "ade20k" for r in published_rows("oasis", "ade20k")
    )
    assert any(r["method"] == "OASIS" for r in published_rows("oasis", "ade20k"))


def test_report_places_a_comparable_row_beside_its_protocols_rows_only() -> None:
    from segldm.evaluation.ldm import published_lines

    oasis = protocol("oasis")
    card = protocol_card(
        check(oasis),
        {},
        num_samples=2000,
        resolution=[256, 256],
        image_format="png",
        sampler={},
        seeds=[0, 1999],
    )
    lines = "\n".join(published_lines(card, {"fid": 30.25, "miou": 0.4512}))
    assert "| OASIS | 28.3 | 48.8 |" in lines and "| **this checkpoint** | 30.2 | 45.1 | this run |" in lines
    assert "SPADE |" not in lines  # SPADE's own-protocol row is not in OASIS's column
    card["comparable"] = False
    assert "not shown" in "\n".join(published_lines(card, {"fid": 30.25, "miou": 0.4512}))


def test_card_key_keeps_only_the_sha256s_of_a_location_mapping() -> None:
    from segldm.evaluation.protocol import without_locations

    card = {
        "segmenter": {
            "weights": {"encoder": "/a/enc.pth", "decoder": "/a/dec.pth"},
            "weights_sha256": {"encoder": "e"},
        }
    }
    moved = {
        "segmenter": {
            "weights": {"encoder": "/b/enc.pth", "decoder": "/b/dec.pth"},
            "weights_sha256": {"encoder": "e"},
        }
    }
    assert (
        without_locations(card)
        == without_locations(moved)
        == {"segmenter": {"weights": {}, "weights_sha256": {"encoder": "e"}}}
    )
    inception = {"weights": {"path": "/a/w.pth", "source": "hub", "sha256": "abc"}}
    assert without_locations(inception) == {"weights": {"sha256": "abc"}}
