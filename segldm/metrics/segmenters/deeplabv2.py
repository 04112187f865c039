"""DeepLabV2-ResNet-101-MSC (COCO-Stuff 164k, 182 classes): the network that labelled S-FLCKR.

The module tree and state_dict names are those of kazuto1011/deeplab-pytorch (``MSC(base=DeepLabV2)``),
so the released ``deeplabv2_resnet101_msc-cocostuff164k-100000.pth`` loads strictly, with or without
its ``num_batches_tracked`` counters. Preprocessing follows the reference: RGB -> BGR, float64
subtraction of the BGR mean (no /255, no std), no resizing, multi-scale max over scales 1, 0.5 and
0.75, logits bilinearly upsampled to the image size. ``protocol="eval"`` is ``main.py test`` (the
mIoU protocol: align_corners=False, softmax, argmax); ``protocol="taming"`` is taming-transformers'
``extract_segmentation.py``, which made the S-FLCKR masks (align_corners=True, argmax).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segldm.metrics.fid import file_sha256
from segldm.metrics.segmenters.label_maps import LabelMap, SameIds
from segldm.storage.checkpoint_files import CheckpointError, read_checkpoint, state_dict_problems

MEAN_BGR = (104.008, 116.669, 122.675)
N_BLOCKS = (3, 4, 23, 3)
ATROUS_RATES = (6, 12, 18, 24)
MSC_SCALES = (0.5, 0.75)
PROTOCOLS = ("eval", "taming")
WEIGHTS_HELP = (
    "Download deeplabv2_resnet101_msc-cocostuff164k-100000.pth (kazuto1011/deeplab-pytorch, release v1.0, "
    "~170 MB) and pass its path as segmenter.weights_path=<file> (default location: "
    "models/segmenters/deeplabv2_resnet101_msc-cocostuff164k-100000.pth). For data without this "
    "label set, train one instead: python -m segldm.train_segmenter data=<...> and segmenter=trained."
)


class ConvBnReLU(nn.Sequential):
    """conv (no bias) -> BN (eps 1e-5) -> optional ReLU, named ``conv``/``bn`` as the reference."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int, padding: int, dilation: int, relu: bool
    ) -> None:
        super().__init__()
        self.add_module("conv", nn.Conv2d(in_ch, out_ch, kernel, stride, padding, dilation, bias=False))
        self.add_module("bn", nn.BatchNorm2d(out_ch, eps=1e-5, momentum=1 - 0.999))
        if relu:
            self.add_module("relu", nn.ReLU())


class Bottleneck(nn.Module):
    """MSRA bottleneck: stride on the first 1x1 (``reduce``), dilated 3x3, 1x1 ``increase``."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, dilation: int, downsample: bool) -> None:
        super().__init__()
        mid = out_ch // 4
        self.reduce = ConvBnReLU(in_ch, mid, 1, stride, 0, 1, True)
        self.conv3x3 = ConvBnReLU(mid, mid, 3, 1, dilation, dilation, True)
        self.increase = ConvBnReLU(mid, out_ch, 1, 1, 0, 1, False)
        self.shortcut = ConvBnReLU(in_ch, out_ch, 1, stride, 0, 1, False) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.increase(self.conv3x3(self.reduce(x)))
        return F.relu(h + self.shortcut(x))


class ResLayer(nn.Sequential):
    """``block1`` (with shortcut and stride) followed by plain blocks, all with the same dilation."""

    def __init__(self, n_blocks: int, in_ch: int, out_ch: int, stride: int, dilation: int) -> None:
        super().__init__()
        for i in range(n_blocks):
            self.add_module(
                f"block{i + 1}",
                Bottleneck(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1, dilation, i == 0),
            )


class Stem(nn.Sequential):
    """7x7/2 conv + BN + ReLU, then a ceil-mode 3x3/2 max pool (so 65 px -> 17, not 16)."""

    def __init__(self, out_ch: int = 64) -> None:
        super().__init__()
        self.add_module("conv1", ConvBnReLU(3, out_ch, 7, 2, 3, 1, True))
        self.add_module("pool", nn.MaxPool2d(3, 2, 1, ceil_mode=True))


class ASPP(nn.Module):
    """Four parallel dilated 3x3 convs with bias; their outputs are summed (DeepLabV2, not V3)."""

    def __init__(self, in_ch: int, out_ch: int, rates: Sequence[int]) -> None:
        super().__init__()
        for i, rate in enumerate(rates):
            self.add_module(f"c{i}", nn.Conv2d(in_ch, out_ch, 3, 1, padding=rate, dilation=rate, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(stage(x) for stage in self.children())  # type: ignore[return-value]


class DeepLabV2(nn.Sequential):
    """ResNet-101 with dilated layer4/layer5 (output stride 8) and the ASPP head."""

    def __init__(
        self, n_classes: int, n_blocks: Sequence[int] = N_BLOCKS, rates: Sequence[int] = ATROUS_RATES
    ) -> None:
        super().__init__()
        self.add_module("layer1", Stem(64))
        self.add_module("layer2", ResLayer(n_blocks[0], 64, 256, 1, 1))
        self.add_module("layer3", ResLayer(n_blocks[1], 256, 512, 2, 1))
        self.add_module("layer4", ResLayer(n_blocks[2], 512, 1024, 1, 2))
        self.add_module("layer5", ResLayer(n_blocks[3], 1024, 2048, 1, 4))
        self.add_module("aspp", ASPP(2048, n_classes, rates))


class MSC(nn.Module):
    """Multi-scale inputs: max over the logits of scale 1 and of the downscaled inputs (eval mode)."""

    def __init__(self, base: nn.Module, scales: Sequence[float] = MSC_SCALES) -> None:
        super().__init__()
        self.base = base
        self.scales = tuple(scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.base(x)
        size = logits.shape[2:]
        pyramid = [logits]
        for p in self.scales:
            # scale_factor (not a computed size) and no recompute: PyTorch >= 1.6 semantics, as the reference
            scaled = F.interpolate(x, scale_factor=p, mode="bilinear", align_corners=False)
            pyramid.append(F.interpolate(self.base(scaled), size=size, mode="bilinear", align_corners=False))
        return torch.stack(pyramid).max(dim=0).values


def deeplabv2_resnet101_msc(n_classes: int = 182) -> MSC:
    """The reference ``DeepLabV2_ResNet101_MSC(n_classes)``, randomly initialised, in eval mode."""
    return MSC(DeepLabV2(n_classes)).eval()


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (N, 3, H, W) -> float32 BGR minus the mean, subtracted in float64 as the reference."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 RGB images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    bgr = images.flip(1).to(torch.float64)
    mean = torch.tensor(MEAN_BGR, dtype=torch.float64).view(1, 3, 1, 1)
    return (bgr - mean).to(torch.float32)


def load_deeplabv2_state_dict(model: MSC, path: str | Path) -> None:
    """Load the released ``.pth`` (keys ``base.*``, a bare state_dict) strictly, counters optional."""
    path = Path(path)
    checkpoint = read_checkpoint(path, what="DeepLabV2 weights file", missing_help=WEIGHTS_HELP)
    state_dict = dict(checkpoint["state_dict"])
    if state_dict and all(k.startswith("module.") for k in state_dict):  # saved from DataParallel
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    own = model.state_dict()
    for key in own:  # the counters have no effect in eval mode; accept files without them
        if key.endswith("num_batches_tracked") and key not in state_dict:
            state_dict[key] = own[key]
    problems = state_dict_problems(own, state_dict)
    if problems:
        raise CheckpointError(
            f"{path} is not DeepLabV2-ResNet-101-MSC weights with {model.base.aspp.c0.out_channels} classes "
            f"(expected the keys of deeplabv2_resnet101_msc-cocostuff164k-100000.pth): "
            + " | ".join(problems)
        )
    model.load_state_dict(state_dict, strict=True)


class DeepLabV2Segmenter:
    """Label uint8 RGB images with DeepLabV2-MSC under the reference preprocessing and protocol."""

    def __init__(
        self,
        weights_path: str | Path,
        n_classes: int = 182,
        protocol: str = "eval",
        device: str | torch.device = "cpu",
        batch_size: int = 4,
        label_map: LabelMap | None = None,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"segmenter.protocol={protocol!r}: expected one of {PROTOCOLS}")
        self.n_classes = n_classes
        self.protocol = protocol
        self.device = torch.device(device)
        self.batch_size = max(1, int(batch_size))
        self.model = deeplabv2_resnet101_msc(n_classes)
        load_deeplabv2_state_dict(self.model, weights_path)
        self.model.to(self.device).eval()
        self.name = f"deeplabv2_resnet101_msc ({protocol} protocol, {Path(weights_path).name})"
        self.weights_path = Path(weights_path)
        # COCO-Stuff masks: 182 classes + the don't-care channel SPADE adds (id 255 -> 182), not scored
        self.label_map: LabelMap = label_map or SameIds(n_classes)
        self.class_names: list[str] | None = None

    def card(self) -> dict[str, object]:
        """What made this segmenter's labels (recorded with every mIoU)."""
        return {
            "name": "deeplabv2_resnet101_msc",
            "weights": str(self.weights_path),
            "weights_sha256": file_sha256(self.weights_path),
            "reference": "kazuto1011/deeplab-pytorch@4219467fa5de07985f834f1bd8c04c186dc8f6d8",
            "preprocessing": {
                "protocol": self.protocol,
                "input": "RGB->BGR minus mean (104.008, 116.669, 122.675), no resize",
                "msc_scales": [1.0, *MSC_SCALES],
                "upsampling": "bilinear align_corners=" + str(self.protocol == "taming"),
            },
            "n_classes": self.n_classes,
            "label_map": self.label_map.description,
        }

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """MSC logits at the network's output size (stride 8) for uint8 RGB images."""
        return self.model(preprocess(images).to(self.device))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 RGB -> (N, H, W) int64 labels at the image size."""
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            logits = self.logits(images[start : start + self.batch_size])
            size = images.shape[2:]
            if self.protocol == "eval":
                up = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
                out.append(F.softmax(up, dim=1).argmax(dim=1).cpu())
            else:  # taming extract_segmentation.py: F.upsample_bilinear == align_corners=True, no softmax
                up = F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
                out.append(up.argmax(dim=1).cpu())
        return torch.cat(out)


def label_margin(logits: torch.Tensor, size: Sequence[int], align_corners: bool) -> np.ndarray:
    """Top-1 minus top-2 of the upsampled logits, per pixel (to find near-ties when comparing labels)."""
    up = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=align_corners)
    top2 = up.topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1]).numpy()


__all__ = [
    "DeepLabV2",
    "DeepLabV2Segmenter",
    "MSC",
    "deeplabv2_resnet101_msc",
    "label_margin",
    "load_deeplabv2_state_dict",
    "preprocess",
]
