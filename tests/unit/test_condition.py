"""The condition object: edges, channels, the fused path, the null condition, colours, checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from segldm.condition import ConditionError, LabelCondition, instance_edges
from segldm.models.cond_stage import SpatialRescaler


def edges_by_loops(ids: np.ndarray) -> np.ndarray:
    """A pixel is an edge when any 4-neighbour inside the image has another id (written pixel by pixel)."""
    height, width = ids.shape
    out = np.zeros((height, width), dtype=np.float32)
    for y in range(height):
        for x in range(width):
            for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
                ny, nx = y + dy, x + dx
                if 0 <= ny < height and 0 <= nx < width and ids[ny, nx] != ids[y, x]:
                    out[y, x] = 1.0
    return out


def test_instance_edges_match_the_four_neighbour_rule():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 3, size=(7, 9))
    ids[2:5, 3:7] = 26001  # a Cityscapes-style instance id (class * 1000 + k)
    got = instance_edges(torch.from_numpy(ids)[None])[0].numpy()
    np.testing.assert_array_equal(got, edges_by_loops(ids))


def test_one_instance_has_no_edges_and_a_split_has_two_columns():
    assert instance_edges(torch.zeros(1, 4, 5, dtype=torch.long)).sum() == 0
    ids = torch.zeros(1, 3, 4, dtype=torch.long)
    ids[..., 2:] = 1
    expected = torch.tensor([[0, 1, 1, 0]] * 3, dtype=torch.float32)
    torch.testing.assert_close(instance_edges(ids)[0], expected)


def test_channels_and_dense_map_with_edges():
    condition = LabelCondition(n_labels=4, ignore_label=255, instance_edges=True)
    assert condition.channels == 5
    labels = torch.tensor([[[0, 1], [255, 3]]])
    instances = torch.tensor([[[1, 1], [2, 2]]])
    dense = condition.dense(labels, instances)
    assert dense.shape == (1, 5, 2, 2)
    torch.testing.assert_close(dense[0, :4, 1, 0], torch.zeros(4))  # the ignore pixel: all-zero labels
    torch.testing.assert_close(dense[0, 4], torch.ones(2, 2))  # every pixel touches the other instance
    assert condition.model_input({"label_map": labels, "instance_map": instances}).shape == (1, 5, 2, 2)


def test_edges_need_an_instance_map():
    condition = LabelCondition(n_labels=4, instance_edges=True)
    with pytest.raises(ConditionError, match="data.instance_edges=true but the batch has no 'instance_map'"):
        condition.model_input({"label_map": torch.zeros(1, 2, 2, dtype=torch.long)})


def test_fused_label_path_equals_the_dense_path_and_edges_enter_the_cond_stage():
    torch.manual_seed(0)
    labels = torch.randint(0, 6, (2, 16, 16))
    plain = LabelCondition(n_labels=6)
    stage = SpatialRescaler(n_stages=2, in_channels=6, out_channels=3)
    fused = plain.encode(stage, plain.model_input({"label_map": labels}))
    dense = plain.encode(stage, plain.model_input({"label_map": labels}, fused=False))
    torch.testing.assert_close(fused, dense, rtol=0, atol=1e-6)

    with_edges = LabelCondition(n_labels=6, instance_edges=True)
    stage7 = SpatialRescaler(n_stages=2, in_channels=7, out_channels=3)
    instances = torch.zeros_like(labels)
    instances[:, :, 8:] = 1
    out = with_edges.encode(stage7, with_edges.model_input({"label_map": labels, "instance_map": instances}))
    # two bilinear halvings are a 4x4 mean per cell: labels' shares (the fused histograms), then the edge share
    edge_share = with_edges.dense(labels, instances)[:, 6:].reshape(2, 1, 4, 4, 4, 4).mean((3, 5))
    expected = plain.encode(SpatialRescaler(n_stages=2, in_channels=6), labels)
    expected = torch.cat([expected, edge_share], 1)
    torch.testing.assert_close(out, stage7.channel_mapper(expected), rtol=0, atol=1e-6)


def test_null_condition_is_zeros_of_the_encoded_shape():
    encoded = torch.randn(2, 3, 4, 4)
    null = LabelCondition(n_labels=5).null(encoded)
    assert null.shape == encoded.shape and not null.any()


def test_colours_ignore_black_edges_white_labels_from_the_palette():
    condition = LabelCondition(n_labels=3, ignore_label=255, instance_edges=True)
    labels = torch.tensor([[[0, 1, 255]]])
    rgb = condition.colorize(labels, torch.tensor([[[7, 7, 7]]]))
    torch.testing.assert_close(rgb[0, :, 0, 2], torch.full((3,), -1.0))
    assert not torch.equal(rgb[0, :, 0, 0], rgb[0, :, 0, 1])
    split = condition.colorize(labels, torch.tensor([[[7, 8, 8]]]))
    torch.testing.assert_close(split[0, :, 0, 0], torch.ones(3))  # edge pixels drawn white


def test_label_checks_and_channel_config_problems(tmp_path):
    condition = LabelCondition(n_labels=4, ignore_label=255, instance_edges=True)
    condition.check_labels(np.array([[0, 3, 255]]), "ok")
    with pytest.raises(ConditionError, match=r"mask.png: label\(s\) \[4\] >= n_labels=4"):
        condition.check_labels(np.array([[0, 4]]), "mask.png")
    assert condition.config_problems(5) == []
    (problem,) = condition.config_problems(4)
    assert "model.cond_stage.in_channels=4 but the condition has 5 channels" in problem

    Image.fromarray(np.array([[0, 1], [2, 3]], dtype=np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(ConditionError, match="no instance map was found"):
        condition.read_files(tmp_path / "m.png")
    Image.fromarray(np.array([[5, 5], [6, 6]], dtype=np.uint8)).save(tmp_path / "i.png")
    read = condition.read_files(tmp_path / "m.png", tmp_path / "i.png")
    assert read["instance_map"].tolist() == [[5, 5], [6, 6]]
