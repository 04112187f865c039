"""UPerNet + ResNet-101 (CSAIL, ADE20K 150 classes): the network that scores ADE20K mIoU.

The module trees and state_dict names are those of CSAILVision/semantic-segmentation-pytorch
(``mit_semseg``: ``Resnet(resnet101())`` and ``UPerNet(fc_dim=2048, fpn_dim=512)``), so the released
``ade20k-resnet101-upernet/{encoder,decoder}_epoch_50.pth`` load strictly, with or without the
BatchNorm counters and the SynchronizedBatchNorm bookkeeping buffers (no effect in eval mode).
Preprocessing and scoring follow the reference evaluation (``eval.py`` with ``ValDataset``): per
scale, the short side goes to the scale (capped so the long side stays within ``max_size``), each
side is truncated to an int and rounded up to a multiple of 32 (the aspect is stretched, not padded),
PIL bilinear resize, ``/255`` and ImageNet mean/std; the decoder upsamples its logits to the image
size and takes the softmax; softmaxes are averaged over the scales, then argmax.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from segldm.metrics.fid import file_sha256
from segldm.metrics.segmenters.label_maps import LabelMap, SameIds
from segldm.storage.checkpoint_files import CheckpointError, read_checkpoint, state_dict_problems

REFERENCE = "CSAILVision/semantic-segmentation-pytorch@8f27c9b97d2ca7c6e05333d5766d144bf7d8c31b"
RELEASE_URL = "http://sceneparsing.csail.mit.edu/model/pytorch/ade20k-resnet101-upernet/"
# config/ade20k-resnet101-upernet.yaml (DATASET.imgSizes, imgMaxSize, padding_constant)
SCALES = (300, 375, 450, 525, 600)
MAX_SIZE = 1000
PADDING_MULTIPLE = 32
# mit_semseg/dataset.py BaseDataset.normalize, applied to [0, 1] RGB
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET101_BLOCKS = (3, 4, 23, 3)
POOL_SCALES = (1, 2, 3, 6)
FPN_INPLANES = (256, 512, 1024, 2048)
# entries a released file may or may not hold: BatchNorm counters (torch >= 0.4.1) and the running
# sums SynchronizedBatchNorm2d keeps for training; none of them is read in eval mode
OPTIONAL_SUFFIXES = ("num_batches_tracked", "_tmp_running_mean", "_tmp_running_var", "_running_iter")
WEIGHTS_HELP = (
    f"Download encoder_epoch_50.pth and decoder_epoch_50.pth from {RELEASE_URL} (~170 MB and ~140 MB) "
    "into models/segmenters/ade20k-resnet101-upernet/ (or pass segmenter.encoder_path=<file> "
    "segmenter.decoder_path=<file>). For data without ADE20K's 150 classes, train one instead: "
    "python -m segldm.train_segmenter data=<...> and segmenter=trained."
)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """The reference's SynchronizedBatchNorm2d as eval mode sees it: plain BatchNorm (eps 1e-5) on the
    running statistics. Its three training-only buffers are kept so the state_dict names match."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features, eps=1e-5, momentum=0.001)
        self.register_buffer("_tmp_running_mean", torch.zeros(num_features))
        self.register_buffer("_tmp_running_var", torch.ones(num_features))
        self.register_buffer("_running_iter", torch.ones(1))


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)


def conv3x3_bn_relu(in_ch: int, out_ch: int) -> nn.Sequential:
    """``models.conv3x3_bn_relu``: indices 0 (conv), 1 (BN), 2 (ReLU)."""
    return nn.Sequential(conv3x3(in_ch, out_ch), SyncBatchNorm2d(out_ch), nn.ReLU(inplace=True))


class Bottleneck(nn.Module):
    """torchvision-style bottleneck (the stride on the 3x3 ``conv2``), expansion 4."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = SyncBatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = SyncBatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = SyncBatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


def res_layer(in_ch: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """``ResNet._make_layer``: block 0 carries the stride and the (1x1 conv + BN) ``downsample``."""
    downsample = None
    if stride != 1 or in_ch != planes * Bottleneck.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(in_ch, planes * 4, 1, stride, bias=False), SyncBatchNorm2d(planes * 4)
        )
    layers = [Bottleneck(in_ch, planes, stride, downsample)]
    layers += [Bottleneck(planes * 4, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class ResNetEncoder(nn.Module):
    """The reference ``Resnet(resnet101())``: deep stem (3x3/2 3->64, 3x3 64->64, 3x3 64->128, each
    + BN + ReLU, then 3x3/2 max pool), four bottleneck stages; returns the four stage outputs (strides
    4, 8, 16, 32). No avgpool/fc: the wrapper drops them, so the encoder file has no such keys."""

    def __init__(self, blocks: Sequence[int] = RESNET101_BLOCKS) -> None:
        super().__init__()
        self.conv1 = conv3x3(3, 64, stride=2)
        self.bn1 = SyncBatchNorm2d(64)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(64, 64)
        self.bn2 = SyncBatchNorm2d(64)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = conv3x3(64, 128)
        self.bn3 = SyncBatchNorm2d(128)
        self.relu3 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = res_layer(128, 64, blocks[0], 1)
        self.layer2 = res_layer(256, 128, blocks[1], 2)
        self.layer3 = res_layer(512, 256, blocks[2], 2)
        self.layer4 = res_layer(1024, 512, blocks[3], 2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.maxpool(x)
        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            features.append(x)
        return features


class UPerNet(nn.Module):
    """The reference ``UPerNet`` decoder: a pyramid pooling module on the last stage (pool, upsample,
    then 1x1 conv), a top-down FPN over the other three, all levels upsampled to stride 4, fused by a
    3x3 conv, then the 1x1 classifier."""

    def __init__(
        self,
        n_classes: int = 150,
        fc_dim: int = 2048,
        fpn_dim: int = 512,
        pool_scales: Sequence[int] = POOL_SCALES,
        fpn_inplanes: Sequence[int] = FPN_INPLANES,
    ) -> None:
        super().__init__()
        self.ppm_pooling = nn.ModuleList(nn.AdaptiveAvgPool2d(s) for s in pool_scales)
        self.ppm_conv = nn.ModuleList(
            nn.Sequential(nn.Conv2d(fc_dim, 512, 1, bias=False), SyncBatchNorm2d(512), nn.ReLU(inplace=True))
            for _ in pool_scales
        )
        self.ppm_last_conv = conv3x3_bn_relu(fc_dim + len(pool_scales) * 512, fpn_dim)
        self.fpn_in = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c, fpn_dim, 1, bias=False), SyncBatchNorm2d(fpn_dim), nn.ReLU(inplace=True)
            )
            for c in fpn_inplanes[:-1]
        )
        self.fpn_out = nn.ModuleList(
            nn.Sequential(conv3x3_bn_relu(fpn_dim, fpn_dim)) for _ in fpn_inplanes[:-1]
        )
        self.conv_last = nn.Sequential(
            conv3x3_bn_relu(len(fpn_inplanes) * fpn_dim, fpn_dim), nn.Conv2d(fpn_dim, n_classes, 1)
        )

    def logits(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Class logits at stride 4 (the output of ``conv_last``)."""
        conv5 = features[-1]
        size = conv5.shape[2:]
        ppm_out = [conv5]
        for pool, conv in zip(self.ppm_pooling, self.ppm_conv, strict=True):
            ppm_out.append(conv(F.interpolate(pool(conv5), size, mode="bilinear", align_corners=False)))
        f = self.ppm_last_conv(torch.cat(ppm_out, 1))
        pyramid = [f]
        for i in reversed(range(len(features) - 1)):
            lateral = self.fpn_in[i](features[i])
            f = lateral + F.interpolate(f, size=lateral.shape[2:], mode="bilinear", align_corners=False)
            pyramid.append(self.fpn_out[i](f))
        pyramid.reverse()  # P2 .. P5
        out_size = pyramid[0].shape[2:]
        fused = [pyramid[0]] + [
            F.interpolate(p, out_size, mode="bilinear", align_corners=False) for p in pyramid[1:]
        ]
        return self.conv_last(torch.cat(fused, 1))

    def forward(self, features: Sequence[torch.Tensor], seg_size: Sequence[int]) -> torch.Tensor:
        """Inference (the reference's ``use_softmax=True``): logits upsampled to ``seg_size``, softmax."""
        up = F.interpolate(self.logits(features), size=tuple(seg_size), mode="bilinear", align_corners=False)
        return F.softmax(up, dim=1)


def scaled_size(height: int, width: int, scale: int, max_size: int, multiple: int) -> tuple[int, int]:
    """``ValDataset``'s input size for one scale: (h, w) * min(scale/short, max_size/long) in float64,
    each truncated to an int, then ``round2nearest_multiple`` (the next multiple, ``((x-1)//p+1)*p``)."""
    factor = min(scale / float(min(height, width)), max_size / float(max(height, width)))
    h, w = int(height * factor), int(width * factor)
    return ((h - 1) // multiple + 1) * multiple, ((w - 1) // multiple + 1) * multiple


def normalize(image: np.ndarray) -> torch.Tensor:
    """``BaseDataset.img_transform``: float32 /255, HWC -> CHW, then (x - mean) / std in float32."""
    x = torch.from_numpy((np.float32(image) / 255.0).transpose(2, 0, 1).copy())
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(mean).div_(std)


def preprocess(
    images: torch.Tensor,
    scales: Sequence[int] = SCALES,
    max_size: int = MAX_SIZE,
    multiple: int = PADDING_MULTIPLE,
) -> list[torch.Tensor]:
    """uint8 RGB (N, 3, H, W) -> one normalised float32 batch per scale, as ``ValDataset`` makes them."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 RGB images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    height, width = images.shape[2:]
    pils = [Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())) for image in images]
    batches = []
    for scale in scales:
        h, w = scaled_size(height, width, scale, max_size, multiple)
        batches.append(
            torch.stack([normalize(np.array(p.resize((w, h), Image.Resampling.BILINEAR))) for p in pils])
        )
    return batches


def load_released(module: nn.Module, path: str | Path, what: str, release_name: str) -> None:
    """Load one released file (a bare state_dict) strictly; optional entries are filled from ``module``."""
    path = Path(path)
    checkpoint = read_checkpoint(path, what=f"UPerNet {what} weights file", missing_help=WEIGHTS_HELP)
    state_dict = dict(checkpoint["state_dict"])
    if state_dict and all(k.startswith("module.") for k in state_dict):  # saved from DataParallel
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    own = module.state_dict()
    for key in own:
        if key.endswith(OPTIONAL_SUFFIXES) and key not in state_dict:
            state_dict[key] = own[key]
    problems = state_dict_problems(own, state_dict)
    if problems:
        swapped = {"encoder": "conv_last.1.weight", "decoder": "layer4.0.conv1.weight"}[what]
        hint = (
            f" (it holds {swapped}: is it the other file? encoder_path and decoder_path swapped?)"
            if swapped in state_dict
            else ""
        )
        raise CheckpointError(
            f"{path} is not the UPerNet-ResNet-101 {what} (expected the keys of {release_name} from "
            f"{RELEASE_URL}){hint}: " + " | ".join(problems)
        )
    module.load_state_dict(state_dict, strict=True)


class UPerNetSegmenter:
    """Label uint8 RGB images with CSAIL's UPerNet-ResNet-101 under the reference ADE20K evaluation."""

    def __init__(
        self,
        encoder_path: str | Path,
        decoder_path: str | Path,
        n_classes: int = 150,
        scales: Sequence[int] = SCALES,
        max_size: int = MAX_SIZE,
        padding_multiple: int = PADDING_MULTIPLE,
        device: str | torch.device = "cpu",
        batch_size: int = 2,
        label_map: LabelMap | None = None,
    ) -> None:
        if not scales or any(int(s) <= 0 for s in scales):
            raise ValueError(
                f"segmenter.scales={list(scales)}: expected one or more positive short-side sizes"
            )
        self.n_classes = n_classes
        self.scales = tuple(int(s) for s in scales)
        self.max_size = int(max_size)
        self.padding_multiple = int(padding_multiple)
        self.device = torch.device(device)
        self.batch_size = max(1, int(batch_size))
        self.encoder = ResNetEncoder()
        self.decoder = UPerNet(n_classes)
        self.encoder_path, self.decoder_path = Path(encoder_path), Path(decoder_path)
        load_released(self.encoder, self.encoder_path, "encoder", "encoder_epoch_50.pth")
        load_released(self.decoder, self.decoder_path, "decoder", "decoder_epoch_50.pth")
        self.encoder.to(self.device).eval()
        self.decoder.to(self.device).eval()
        self.name = f"upernet_resnet101 ({self.encoder_path.name}, {self.decoder_path.name})"
        # ADE20K masks: channels 0..149 = ids 1..150 = the reference's classes 0..149; 150 ("other") not scored
        self.label_map: LabelMap = label_map or SameIds(n_classes)
        self.class_names: list[str] | None = None

    def card(self) -> dict[str, Any]:
        """What made this segmenter's labels (recorded with every mIoU)."""
        return {
            "name": "upernet_resnet101_ade20k",
            "weights": {"encoder": str(self.encoder_path), "decoder": str(self.decoder_path)},
            "weights_sha256": {
                "encoder": file_sha256(self.encoder_path),
                "decoder": file_sha256(self.decoder_path),
            },
            "reference": REFERENCE,
            "preprocessing": {
                "scales": list(self.scales),
                "max_size": self.max_size,
                "padding_multiple": self.padding_multiple,
                "resize": "PIL bilinear to (int(side * scale) rounded up to the multiple), aspect stretched",
                "normalize": f"/255, mean {list(IMAGENET_MEAN)}, std {list(IMAGENET_STD)}",
                "scoring": "softmax of logits upsampled (bilinear) to the image size, mean over scales, argmax",
            },
            "n_classes": self.n_classes,
            "label_map": self.label_map.description,
        }

    @torch.no_grad()
    def scale_probabilities(self, batch: torch.Tensor, seg_size: Sequence[int]) -> torch.Tensor:
        """Softmax at ``seg_size`` for one preprocessed scale: ``SegmentationModule(..., segSize)``."""
        return self.decoder(self.encoder(batch.to(self.device)), seg_size)

    @torch.no_grad()
    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax averaged over the scales, accumulated in the reference's order, (N, C, H, W)."""
        size = tuple(images.shape[2:])
        scores = torch.zeros(images.shape[0], self.n_classes, *size, device=self.device)
        for batch in preprocess(images, self.scales, self.max_size, self.padding_multiple):
            scores = scores + self.scale_probabilities(batch, size) / len(self.scales)
        return scores

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 RGB -> (N, H, W) int64 labels at the image size."""
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            _, labels = torch.max(self.scores(images[start : start + self.batch_size]), dim=1)
            out.append(labels.cpu())
        return torch.cat(out)


def split_prefixed(weights: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A fixture's ``encoder.``/``decoder.``-prefixed state_dict -> the two released files' state_dicts."""
    parts: dict[str, dict[str, torch.Tensor]] = {"encoder": {}, "decoder": {}}
    for key, value in weights.items():
        part, _, name = key.partition(".")
        if part not in parts:
            raise ValueError(f"key {key!r}: expected the prefix 'encoder.' or 'decoder.'")
        parts[part][name] = value
    return parts


__all__ = [
    "MAX_SIZE",
    "PADDING_MULTIPLE",
    "RELEASE_URL",
    "SCALES",
    "ResNetEncoder",
    "UPerNet",
    "UPerNetSegmenter",
    "load_released",
    "preprocess",
    "scaled_size",
    "split_prefixed",
]
