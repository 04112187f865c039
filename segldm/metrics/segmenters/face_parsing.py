"""CelebAMask-HQ's face-parsing U-Net (19 classes): the network behind CelebAMask-HQ mIoU.

The network is the one the dataset's authors trained and released with it
(switchablenorms/CelebAMask-HQ ``face_parsing/unet.py``: ``unet(feature_scale=4, n_classes=19,
is_deconv=True, is_batchnorm=True)``, weights ``model.pth``). NVlabs/imaginaire scores semantic image
synthesis on CelebAMask-HQ with that same file (``imaginaire/evaluation/segmentation/common.py``
downloads its Google Drive id; ``celebamask_hq.py`` is the network), and SCDM (mlvlab/SCDM, README,
"mIoU") measures CelebAMask-HQ mIoU through imaginaire. Module names follow the reference, so the
released state_dict loads strictly, with or without its BatchNorm counters.

Preprocessing is imaginaire's: uint8 RGB -> ``ToTensor`` (/255) -> ``Normalize(0.5, 0.5)`` ([-1, 1]),
bicubic resize to 512x512 with ``align_corners=True``, U-Net, argmax at 512x512. imaginaire then
scores that 512x512 map against the mask resized to 512 (nearest); :meth:`predict` returns labels at
the image size instead, the 512 map resampled nearest (pixel ``i * 512 // H``). At the masks' own
512x512 this is the reference exactly; for smaller images :meth:`predict_at_input_size` gives the
reference's 512 map. The 19 labels are g_mask.py's order (background, skin, nose, eye_g, ...), the
order ``data=celebamask_hq`` merges the part masks in, so dataset id i is class i.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from segldm.metrics.fid import file_sha256
from segldm.metrics.segmenters.label_maps import LabelMap, SameIds
from segldm.storage.checkpoint_files import CheckpointError, read_checkpoint, state_dict_problems

INPUT_SIZE = 512
FEATURE_SCALE = 4
WIDTHS = (64, 128, 256, 512, 1024)
CLASS_NAMES = (
    "background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
    "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth",
)  # fmt: skip
WEIGHTS_URL = "https://drive.google.com/file/d/1o1m-eT38zNCIFldcRaoWcLvvBtY8S4W3/view"
REFERENCE = "NVlabs/imaginaire@c6f74845c699c58975fd12b778c375b72eb00e8d"
NETWORK_SOURCE = "switchablenorms/CelebAMask-HQ@3f6c45df5e67130568f9459f24f8d6a5ff836d30:face_parsing/unet.py"
WEIGHTS_HELP = (
    f"Download the CelebAMask-HQ face-parsing model.pth ({WEIGHTS_URL}, linked from "
    "switchablenorms/CelebAMask-HQ face_parsing/README.md; imaginaire caches the same file as "
    "~/.cache/torch/hub/checkpoints/celebamask_hq.pt) and pass its path as segmenter.weights_path=<file> "
    "(default location: models/segmenters/celebamask_hq_face_parsing_unet.pth). Without it, train one "
    "on the dataset instead: python -m segldm.train_segmenter data=celebamask_hq and segmenter=trained."
)


class DoubleConv(nn.Module):
    """Two 3x3 conv (bias) -> BN -> ReLU stages, named ``conv1``/``conv2`` as ``unetConv2``."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, 1, 1), nn.BatchNorm2d(out_ch), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(out_ch, out_ch, 3, 1, 1), nn.BatchNorm2d(out_ch), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class UpConcat(nn.Module):
    """``unetUp``: 2x2/2 transposed conv of the coarse map, concat [skip, up], DoubleConv."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = DoubleConv(in_ch, out_ch)  # registered before `up`: the reference key order
        self.up = nn.ConvTranspose2d(in_ch, out_ch, kernel_size=2, stride=2)

    def forward(self, skip: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        up = self.up(coarse)
        offset = up.shape[2] - skip.shape[2]  # 0 at 512 px; the reference pads the skip by it
        skip = F.pad(skip, 2 * [offset // 2, offset // 2])
        return self.conv(torch.cat([skip, up], 1))


class FaceParsingUNet(nn.Module):
    """The reference ``unet()``: 4 max-pooled levels of widths 64..1024 / ``feature_scale``, 1x1 head."""

    def __init__(self, n_classes: int = len(CLASS_NAMES), feature_scale: int = FEATURE_SCALE) -> None:
        super().__init__()
        w = [c // feature_scale for c in WIDTHS]
        self.conv1 = DoubleConv(3, w[0])
        self.conv2 = DoubleConv(w[0], w[1])
        self.conv3 = DoubleConv(w[1], w[2])
        self.conv4 = DoubleConv(w[2], w[3])
        self.center = DoubleConv(w[3], w[4])
        self.up_concat4 = UpConcat(w[4], w[3])
        self.up_concat3 = UpConcat(w[3], w[2])
        self.up_concat2 = UpConcat(w[2], w[1])
        self.up_concat1 = UpConcat(w[1], w[0])
        self.final = nn.Conv2d(w[0], n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1 = self.conv1(x)
        c2 = self.conv2(F.max_pool2d(c1, 2))
        c3 = self.conv3(F.max_pool2d(c2, 2))
        c4 = self.conv4(F.max_pool2d(c3, 2))
        center = self.center(F.max_pool2d(c4, 2))
        up = self.up_concat1(c1, self.up_concat2(c2, self.up_concat3(c3, self.up_concat4(c4, center))))
        return self.final(up)


def preprocess(
    images: torch.Tensor, input_size: int = INPUT_SIZE, align_corners: bool = True
) -> torch.Tensor:
    """uint8 RGB (N, 3, H, W) -> float32 in [-1, 1] as ToTensor + Normalize(0.5, 0.5), then the
    reference forward's bicubic resize to ``input_size`` square (no clamp: bicubic may overshoot)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 RGB images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    x = (images.float().div(255) - 0.5) / 0.5
    return F.interpolate(x, size=(input_size, input_size), mode="bicubic", align_corners=align_corners)


def load_face_parsing_state_dict(model: FaceParsingUNet, path: str | Path) -> None:
    """Load the released ``model.pth`` (a bare state_dict) strictly; BN counters optional, a
    DataParallel ``module.`` prefix stripped. Another file: CheckpointError naming the bad keys."""
    path = Path(path)
    checkpoint = read_checkpoint(
        path, what="CelebAMask-HQ face-parsing weights file", missing_help=WEIGHTS_HELP
    )
    state_dict = dict(checkpoint["state_dict"])
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    own = model.state_dict()
    for key in own:  # the counters have no effect in eval mode; accept files without them
        if key.endswith("num_batches_tracked") and key not in state_dict:
            state_dict[key] = own[key]
    problems = state_dict_problems(own, state_dict)
    if problems:
        raise CheckpointError(
            f"{path} is not the CelebAMask-HQ face-parsing U-Net (feature_scale={FEATURE_SCALE}, "
            f"{model.final.out_channels} classes; expected the keys of its model.pth): "
            + " | ".join(problems)
        )
    model.load_state_dict(state_dict, strict=True)


class FaceParsingSegmenter:
    """Label uint8 RGB face images with the CelebAMask-HQ U-Net under imaginaire's protocol."""

    def __init__(
        self,
        weights_path: str | Path,
        input_size: int = INPUT_SIZE,
        align_corners: bool = True,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        label_map: LabelMap | None = None,
    ) -> None:
        if input_size <= 0 or input_size % 16:
            raise ValueError(f"segmenter.input_size={input_size}: the U-Net needs a positive multiple of 16")
        self.n_classes = len(CLASS_NAMES)
        self.class_names: list[str] | None = list(CLASS_NAMES)
        self.input_size = input_size
        self.align_corners = align_corners
        self.device = torch.device(device)
        self.batch_size = max(1, int(batch_size))
        self.weights_path = Path(weights_path)
        self.model = FaceParsingUNet().eval()
        load_face_parsing_state_dict(self.model, self.weights_path)
        self.model.to(self.device)
        self.name = f"face_parsing_unet (CelebAMask-HQ, {self.weights_path.name})"
        # data=celebamask_hq merges the parts in the network's own order: 19 ids, no don't-care channel
        self.label_map: LabelMap = label_map or SameIds(self.n_classes, dontcare_channels=0)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 19, input_size, input_size) logits of uint8 RGB images."""
        return self.model(preprocess(images, self.input_size, self.align_corners).to(self.device))

    @torch.no_grad()
    def predict_at_input_size(self, images: torch.Tensor) -> torch.Tensor:
        """(N, input_size, input_size) int64 labels: the map imaginaire scores."""
        out = [
            self.logits(images[start : start + self.batch_size]).argmax(dim=1).cpu()
            for start in range(0, images.shape[0], self.batch_size)
        ]
        return torch.cat(out)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 RGB -> (N, H, W) int64 labels: the input-size map, nearest to H x W."""
        labels = self.predict_at_input_size(images)
        if tuple(labels.shape[1:]) == tuple(images.shape[2:]):
            return labels
        resized = F.interpolate(labels[:, None].float(), size=tuple(images.shape[2:]), mode="nearest")
        return resized[:, 0].long()

    def card(self) -> dict[str, object]:
        """What made this segmenter's labels (recorded with every mIoU)."""
        return {
            "name": "face_parsing_unet_celebamask_hq",
            "weights": str(self.weights_path),
            "weights_sha256": file_sha256(self.weights_path),
            "weights_url": WEIGHTS_URL,
            "reference": REFERENCE,
            "network": NETWORK_SOURCE,
            "preprocessing": {
                "input": "RGB /255, (x - 0.5) / 0.5 -> [-1, 1] (ToTensor + Normalize)",
                "resize": f"bicubic to {self.input_size}x{self.input_size}, align_corners={self.align_corners}",
                "output": f"argmax at {self.input_size}x{self.input_size}, nearest to the image size",
            },
            "n_classes": self.n_classes,
            "label_map": self.label_map.description,
        }


__all__ = [
    "CLASS_NAMES",
    "FaceParsingSegmenter",
    "FaceParsingUNet",
    "load_face_parsing_state_dict",
    "preprocess",
]
