"""DRN-D-105 (fyu/drn ``DRNSeg``, 19 Cityscapes trainIds): the network behind SPADE, OASIS and SDM's
Cityscapes mIoU.

The module tree and state_dict names are those of fyu/drn ``segment.py`` (``DRNSeg('drn_d_105', 19)``:
``base.0`` .. ``base.8`` = DRN layer0..layer8, ``seg`` 1x1 conv, ``up`` a depthwise ConvTranspose2d), so
the released ``drn-d-105_ms_cityscapes.pth`` loads strictly. ``up.weight`` is read from the file, as
the reference's strict ``load_state_dict`` does; it is the bilinear kernel of :func:`fill_up_weights`
in the released model, since training never updates it.

Preprocessing and labels follow ``segment.py test``: RGB / 255 (ToTensor), then ``(x - mean) / std``
with the dataset's ``info.json`` statistics (float32), no resizing; ``DRNSeg.forward`` upsamples the
stride-8 logits 8x with ``up`` and takes ``log_softmax``; the label is the argmax over classes. With
``scales`` set it is ``segment.py test --ms`` (``test_ms``): PIL-bicubic rescaled copies of each image,
each log-softmax map resized back with PIL bilinear, summed, argmax.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from cityscapesscripts.helpers.labels import labels as cityscapes_labels
from PIL import Image
from torch import nn

from segldm.metrics.fid import file_sha256
from segldm.metrics.segmenters.label_maps import CityscapesTrainIds, LabelMap
from segldm.storage.checkpoint_files import CheckpointError, read_checkpoint, state_dict_problems

REFERENCE = "fyu/drn@d75db2ee7070426db7a9264ee61cf489f8cf178c"
WEIGHTS_NAME = "drn-d-105_ms_cityscapes.pth"
# fyu/drn datasets/cityscapes/info.json: mean and std of the Cityscapes training images, RGB in [0, 1]
# (segment.py test reads them from <data_dir>/info.json; the README prints them rounded to 6 digits)
CITYSCAPES_MEAN = (0.29010095242892997, 0.32808144844279574, 0.28696394422942517)
CITYSCAPES_STD = (0.1829540508368939, 0.18656561047509476, 0.18447508988480435)
# segment.py test_seg: the extra scales of --ms (the full-size image is always included)
REFERENCE_MS_SCALES = (0.5, 0.75, 1.25, 1.5, 1.75)
# DRN-D-105: channels and block counts of layer0..layer8 (drn.py drn_d_105, arch 'D', Bottleneck)
CHANNELS = (16, 32, 64, 128, 256, 512, 512, 512)
LAYERS = (1, 1, 3, 4, 23, 3, 1, 1)
OUTPUT_STRIDE = 8
WEIGHTS_HELP = (
    f"Download {WEIGHTS_NAME} (DRN-D-105 trained on Cityscapes fine, 19 trainIds, ~200 MB) from the folder "
    "the fyu/drn README links under 'Testing': http://go.yf.io/drn-cityscapes-models (a Google Drive "
    "folder), and pass its path as segmenter.weights_path=<file> (default location: "
    f"models/segmenters/{WEIGHTS_NAME}). For data without the Cityscapes classes, train one instead: "
    "python -m segldm.train_segmenter data=<...> and segmenter=trained."
)


def trainid_names() -> list[str]:
    """The 19 evaluated Cityscapes classes by trainId (cityscapesscripts' table): road .. bicycle."""
    names = {label.trainId: label.name for label in cityscapes_labels if 0 <= label.trainId < 19}
    return [names[i] for i in range(19)]


def conv_layers(in_ch: int, out_ch: int, convs: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """DRN-D's plain stages (``_make_conv_layers``): [3x3 conv (no bias), BN, ReLU] x ``convs``."""
    modules: list[nn.Module] = []
    for i in range(convs):
        modules += [
            nn.Conv2d(
                in_ch if i == 0 else out_ch,
                out_ch,
                3,
                stride if i == 0 else 1,
                dilation,
                dilation,
                bias=False,
            ),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*modules)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 (x4 channels), BN after each, optional ``downsample``."""

    expansion = 4

    def __init__(
        self, in_ch: int, planes: int, stride: int = 1, dilation: int = 1, downsample: bool = False
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(nn.Conv2d(in_ch, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))
            if downsample
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


def bottleneck_layer(
    in_ch: int, planes: int, blocks: int, stride: int = 1, dilation: int = 1
) -> nn.Sequential:
    """``_make_layer``: the first block changes width/stride (1x1 downsample), all share the dilation
    (DRN-D-105's dilated layers use ``new_level=False``, so the first block is dilated too)."""
    first = Bottleneck(in_ch, planes, stride, dilation, downsample=stride != 1 or in_ch != planes * 4)
    rest = [Bottleneck(planes * 4, planes, 1, dilation) for _ in range(1, blocks)]
    return nn.Sequential(first, *rest)


def drn_d_105_base(channels: Sequence[int] = CHANNELS, layers: Sequence[int] = LAYERS) -> nn.Sequential:
    """DRN-D-105 without its classifier (``avgpool``, ``fc``): output stride 8, ``channels[-1]`` wide."""
    c, n = channels, layers
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, c[0], 7, 1, 3, bias=False), nn.BatchNorm2d(c[0]), nn.ReLU(inplace=True)),
        conv_layers(c[0], c[0], n[0], stride=1),
        conv_layers(c[0], c[1], n[1], stride=2),
        bottleneck_layer(c[1], c[2], n[2], stride=2),
        bottleneck_layer(c[2] * 4, c[3], n[3], stride=2),
        bottleneck_layer(c[3] * 4, c[4], n[4], dilation=2),
        bottleneck_layer(c[4] * 4, c[5], n[5], dilation=4),
        conv_layers(c[5] * 4, c[6], n[6], dilation=2),
        conv_layers(c[6], c[7], n[7], dilation=1),
    )


def fill_up_weights(up: nn.ConvTranspose2d) -> None:
    """The bilinear kernel ``segment.py`` puts in every channel of ``up`` (not trained afterwards)."""
    size = up.weight.shape[2]
    f = math.ceil(size / 2)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    with torch.no_grad():
        for i in range(size):
            for j in range(up.weight.shape[3]):
                up.weight[0, 0, i, j] = (1 - math.fabs(i / f - c)) * (1 - math.fabs(j / f - c))
        up.weight[1:, 0] = up.weight[0, 0]


class DRNSeg(nn.Module):
    """``base`` -> 1x1 ``seg`` -> 8x ``up`` -> log_softmax; returns (log-probabilities, stride-8 logits)."""

    def __init__(self, n_classes: int = 19) -> None:
        super().__init__()
        self.base = drn_d_105_base()
        self.seg = nn.Conv2d(CHANNELS[-1], n_classes, 1, bias=True)
        self.up = nn.ConvTranspose2d(n_classes, n_classes, 16, 8, 4, groups=n_classes, bias=False)
        fill_up_weights(self.up)
        self.up.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.seg(self.base(x))
        return F.log_softmax(self.up(logits), dim=1), logits


def drn_d_105_seg(n_classes: int = 19) -> DRNSeg:
    """The reference ``DRNSeg('drn_d_105', n_classes, pretrained=False)``, in eval mode."""
    return DRNSeg(n_classes).eval()


def preprocess(
    images: torch.Tensor, mean: Sequence[float] = CITYSCAPES_MEAN, std: Sequence[float] = CITYSCAPES_STD
) -> torch.Tensor:
    """uint8 RGB (N, 3, H, W) -> float32 ``(x / 255 - mean) / std``, each step in float32 as the reference."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 RGB images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.float().div(255) - m) / s


def load_drn_state_dict(model: DRNSeg, path: str | Path) -> None:
    """Load the released ``.pth`` (a bare state_dict, keys ``base.*``, ``seg.*``, ``up.weight``) strictly;
    a training checkpoint (``{'state_dict': module.*}``) loads too; BatchNorm counters are optional
    (the released file predates them)."""
    path = Path(path)
    checkpoint = read_checkpoint(path, what="DRN-D-105 weights file", missing_help=WEIGHTS_HELP)
    state_dict = dict(checkpoint["state_dict"])
    if state_dict and all(k.startswith("module.") for k in state_dict):  # saved from DataParallel
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    own = model.state_dict()
    for key in own:  # no effect in eval mode; torch < 0.4 (the released file) did not write them
        if key.endswith("num_batches_tracked") and key not in state_dict:
            state_dict[key] = own[key]
    problems = state_dict_problems(own, state_dict)
    if problems:
        raise CheckpointError(
            f"{path} is not DRN-D-105 (fyu/drn DRNSeg) weights with {model.seg.out_channels} classes "
            f"(expected the keys of {WEIGHTS_NAME}): " + " | ".join(problems)
        )
    model.load_state_dict(state_dict, strict=True)


def resize_maps(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, C, h, w) float32 -> (N, C, height, width), each channel by PIL bilinear (``resize_4d_tensor``)."""
    if maps.shape[2:] == (height, width):
        return maps
    out = np.empty((*maps.shape[:2], height, width), dtype=np.float32)
    for i in range(maps.shape[0]):
        for j in range(maps.shape[1]):
            out[i, j] = np.asarray(
                Image.fromarray(maps[i, j]).resize((width, height), Image.Resampling.BILINEAR)
            )
    return out


def rescale_images(images: torch.Tensor, scale: float) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> PIL-bicubic resized to (int(H*s), int(W*s)), as ``SegListMS``."""
    h, w = images.shape[2:]
    size = (int(w * scale), int(h * scale))
    out = [
        np.asarray(Image.fromarray(image.permute(1, 2, 0).numpy()).resize(size, Image.Resampling.BICUBIC))
        for image in images.cpu()
    ]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


class DRNSegmenter:
    """Label uint8 RGB images with DRN-D-105 under ``segment.py test`` (``scales``: ``test --ms``)."""

    def __init__(
        self,
        weights_path: str | Path,
        n_classes: int = 19,
        mean: Sequence[float] = CITYSCAPES_MEAN,
        std: Sequence[float] = CITYSCAPES_STD,
        scales: Sequence[float] | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 4,
        label_map: LabelMap | None = None,
    ) -> None:
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"segmenter.mean={list(mean)}, std={list(std)}: expected 3 values each, std > 0")
        if scales is not None and (not scales or min(scales) <= 0):
            raise ValueError(f"segmenter.scales={scales}: expected null (single scale) or positive scales")
        self.n_classes = n_classes
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.scales = None if scales is None else tuple(float(s) for s in scales)
        self.device = torch.device(device)
        self.batch_size = max(1, int(batch_size))
        self.weights_path = Path(weights_path)
        self.model = drn_d_105_seg(n_classes)
        load_drn_state_dict(self.model, weights_path)
        self.model.to(self.device).eval()
        protocol = "single scale" if self.scales is None else f"multi-scale {list(self.scales)}"
        self.name = f"drn_d_105 ({protocol}, {self.weights_path.name})"
        self.label_map: LabelMap = label_map or CityscapesTrainIds()
        self.class_names: list[str] | None = trainid_names() if n_classes == 19 else None

    def card(self) -> dict[str, object]:
        """What made this segmenter's labels (recorded with every mIoU)."""
        return {
            "name": "drn_d_105",
            "weights": str(self.weights_path),
            "weights_sha256": file_sha256(self.weights_path),
            "reference": f"{REFERENCE} (segment.py test{'' if self.scales is None else ' --ms'})",
            "preprocessing": {
                "input": "RGB / 255, then (x - mean) / std in float32, no resize",
                "mean": list(self.mean),
                "std": list(self.std),
                "scales": None if self.scales is None else [1.0, *self.scales],
                "output": "8x ConvTranspose2d up (weights from the file), log_softmax, argmax"
                + ("" if self.scales is None else "; per scale PIL bicubic input, PIL bilinear output, sum"),
            },
            "n_classes": self.n_classes,
            "label_map": self.label_map.description,
        }

    @torch.no_grad()
    def log_probs(self, images: torch.Tensor) -> torch.Tensor:
        """``DRNSeg`` log-probabilities at 8x the stride-8 grid (H, W when they are multiples of 8)."""
        return self.model(preprocess(images, self.mean, self.std).to(self.device))[0]

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 RGB -> (N, H, W) int64 trainIds."""
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            batch = images[start : start + self.batch_size]
            out.append(self.predict_single(batch) if self.scales is None else self.predict_multiscale(batch))
        return torch.cat(out)

    def predict_single(self, images: torch.Tensor) -> torch.Tensor:
        """``test``: argmax of the log-probabilities. The map is 8*ceil(H/8) high; for sizes that are not
        multiples of 8 (where the reference writes the larger map) its top-left H x W is kept."""
        h, w = images.shape[2:]
        return self.log_probs(images)[:, :, :h, :w].max(dim=1).indices.cpu()

    def predict_multiscale(self, images: torch.Tensor) -> torch.Tensor:
        """``test_ms``: log-probabilities of the image and of each rescaled copy, resized to H x W, summed."""
        h, w = images.shape[2:]
        batches = [images] + [rescale_images(images, s) for s in self.scales or ()]
        total = sum(resize_maps(self.log_probs(b).cpu().numpy(), h, w) for b in batches)
        return torch.from_numpy(np.asarray(total).argmax(axis=1)).to(torch.int64)


__all__ = [
    "CITYSCAPES_MEAN",
    "CITYSCAPES_STD",
    "DRNSeg",
    "DRNSegmenter",
    "drn_d_105_seg",
    "fill_up_weights",
    "load_drn_state_dict",
    "preprocess",
    "trainid_names",
]
