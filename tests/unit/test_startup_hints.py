"""Every way out a start-up check prints is a setting that works, and values of the wrong kind fail first.

Each case: a bad config, the fragment that names its problem, and the hints the message gives (each
a set of overrides, printed as written). The test asserts each hint is printed, applies it to the bad
config, and asserts that problem is gone.
"""

from __future__ import annotations

import pytest
import torch

from segldm.config.shapes import group_choice_overrides, shape_problems
from segldm.models.perceptual import PerceptualWeightsError, find_vgg16_weights
from segldm.runtime.checks import ConfigError, validate_config
from tests.conftest import compose_train

HINT_CASES = [
    # (bad overrides, fragment of the problem, [(hint as printed, overrides that follow it), ...])
    (["data.size=66"], "data.size=66", [("64 or 80", ["data.size=64"]), ("64 or 80", ["data.size=80"])]),
    (["data.size=50"], "data.size=50", [("48 or 64", ["data.size=48"]), ("48 or 64", ["data.size=64"])]),
    (["data.size=72"], "data.size=72", [("64 or 80", ["data.size=64"]), ("64 or 80", ["data.size=80"])]),
    (
        ["model=autoencoder", "data.size=50"],
        "data.size=50",
        [("48 or 52", ["data.size=48"]), ("48 or 52", ["data.size=52"])],
    ),
    (["model.sampler.steps=36"], "model.sampler.steps=36", [("35 or 38", ["model.sampler.steps=35"])]),
    (["model.sampler.steps=36"], "model.sampler.steps=36", [("35 or 38", ["model.sampler.steps=38"])]),
    (
        ["callbacks.sample_grid.ddim_steps=9"],
        "callbacks.sample_grid.ddim_steps=9",
        [
            ("8 or 10", ["callbacks.sample_grid.ddim_steps=8"]),
            ("8 or 10", ["callbacks.sample_grid.ddim_steps=10"]),
        ],
    ),
    (
        ["model.scale_by_std=true", "model.scale_factor=0.18215"],
        "model.scale_factor=0.18215",
        [
            ("model.scale_factor=1.0", ["model.scale_factor=1.0"]),
            ("model.scale_by_std=false", ["model.scale_by_std=false"]),
        ],
    ),
    (
        ["model.diffusion.zero_terminal_snr=true"],
        "zero_terminal_snr=true with parameterization=eps",
        [("model.diffusion.parameterization=v", ["model.diffusion.parameterization=v"])],
    ),
    (
        ["model.sampler.name=plms"],
        "model.sampler.name='plms'",
        [("dpm_solver++", ["model.sampler.name=dpm_solver++"]), ("ddim", ["model.sampler.name=ddim"])],
    ),
    (
        ["model.first_stage.ckpt_path=null"],
        "ckpt_path is null",
        [("model.require_pretrained_first_stage=false", ["model.require_pretrained_first_stage=false"])],
    ),
    (
        ["data=folder", "model.performance.cache_latents=true"],
        "cache_latents=true",
        [
            ("model.performance.cache_latents=false", ["model.performance.cache_latents=false"]),
            (
                "data.train.random_crop=false data.train.flip=false",
                ["data.train.random_crop=false", "data.train.flip=false"],
            ),
        ],
    ),
]


def _config(overrides, tmp_path):
    ckpt = tmp_path / "fs.ckpt"
    ckpt.write_bytes(b"x")
    base = [f"paths.output_root={tmp_path}", f"paths.output_dir={tmp_path}"]
    if "model.first_stage.ckpt_path=null" not in overrides:
        base.append(f"model.first_stage.ckpt_path={ckpt}")
    return compose_train([*base, *overrides])


def _problems(overrides, tmp_path) -> str:
    try:
        validate_config(_config(overrides, tmp_path))
    except ConfigError as err:
        return str(err)
    return ""


@pytest.mark.parametrize(("bad", "fragment", "hints"), HINT_CASES)
def test_each_printed_hint_fixes_its_problem(bad, fragment, hints, tmp_path):
    message = _problems(bad, tmp_path)
    assert fragment in message
    for printed, overrides in hints:
        assert printed in message, f"the hint {printed!r} is not in: {message}"
        after = _problems([*bad, *overrides], tmp_path)
        assert fragment not in after, f"following {overrides} left: {after}"


def test_flat_option_hint_names_the_key_that_works(tmp_path):
    message = _problems(["+model.base_learning_rate=1e-4"], tmp_path)
    assert "set model.optimization.base_learning_rate instead" in message
    assert _problems(["model.optimization.base_learning_rate=1e-4"], tmp_path) == ""


def test_lpips_weights_error_names_the_key_it_came_from(tmp_path):
    with pytest.raises(PerceptualWeightsError, match=r"^eval\.lpips_vgg16_path=none: no such file"):
        find_vgg16_weights("none", key="eval.lpips_vgg16_path")
    with pytest.raises(PerceptualWeightsError, match=r"^model\.loss\.vgg16_path=/no/vgg.pth"):
        find_vgg16_weights("/no/vgg.pth")
    weights = tmp_path / "vgg.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, weights)
    assert find_vgg16_weights(str(weights), key="eval.lpips_vgg16_path") == weights


# ------------------------------------------------------------------------------------ declared shapes
def test_scalar_where_a_group_belongs_names_the_group_and_its_keys():
    reference = {"eval": {"bootstrap": {"draws": 1000, "level": 0.95}, "batch_size": 8}}
    problems = shape_problems({"eval": {"bootstrap": 0, "batch_size": 8}}, reference)
    assert len(problems) == 1
    assert (
        "eval.bootstrap=0 is a number, but eval.bootstrap is a group of settings (draws, level)"
        in problems[0]
    )
    assert "eval.bootstrap.draws=1000" in problems[0]


@pytest.mark.parametrize(
    ("value", "fragment"),
    [("abc", "data.batch_size='abc' is a text, but data.batch_size takes a number"), ([1], "is a list")],
)
def test_text_or_list_where_a_number_belongs(value, fragment):
    problems = shape_problems({"data": {"batch_size": value}}, {"data": {"batch_size": 12}})
    assert problems and fragment in problems[0]


def test_same_shapes_nulls_interpolations_and_open_keys_pass():
    reference = {
        "a": 1,
        "b": True,
        "c": None,
        "d": "${x}",
        "g": {"h": 2.5},
        "model": {"performance": {"compile": False}},
    }
    actual = {
        "a": 2.0,
        "b": False,
        "c": "anything",
        "d": 3,
        "g": {"h": 1},
        "model": {"performance": {"compile": {"mode": "max"}}},
    }
    assert shape_problems(actual, reference) == []
    assert shape_problems({"b": "yes"}, reference) == [
        "b='yes' is a text, but b takes a switch (like its default, True)"
    ]


def test_reference_keeps_only_the_group_choices():
    groups = ["data", "model", "model/first_stage", "experiment"]
    overrides = ["data=folder", "data.size=50", "+experiment=quickstart", "model/first_stage=vq_f4", "seed=3"]
    assert group_choice_overrides(overrides, groups) == [
        "data=folder",
        "+experiment=quickstart",
        "model/first_stage=vq_f4",
    ]
