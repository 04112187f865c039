"""A small fully-convolutional segmenter trained on a dataset's own real images.

For data without a released segmentation network (the built-in scenes, any folder dataset), mIoU of
generated images needs a labeller that knows the dataset's classes: ``python -m
segldm.train_segmenter data=...`` trains :class:`SegNet` on the real training images, and
``segmenter=trained`` loads it for evaluation. Its real-image mIoU (recorded in its checkpoint) is
the ceiling generated images are measured against.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from segldm.metrics.fid import file_sha256
from segldm.metrics.segmenters.label_maps import LabelMap, SameIds
from segldm.storage.checkpoint_files import (
    CheckpointError,
    checkpoint_kind,
    load_strict,
    read_checkpoint,
    state_dict_of,
    wrong_kind,
)

KIND = "segmenter"
TRAIN_HELP = (
    "Train one on the dataset's real images: python -m segldm.train_segmenter data=<same data option> "
    "(make train-segmenter for the built-in data), then pass segmenter.ckpt=<its segmenter.ckpt>"
)


def conv_block(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """3x3 conv -> BatchNorm -> ReLU (padding keeps the size at stride 1)."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class SegNet(nn.Module):
    """Two-level encoder-decoder with a dilated bottleneck and skip connections.

    Full-resolution features see colour and fine texture; the 1/4 bottleneck (dilations 1, 2, 4)
    sees ~40 px of context, enough to tell textures (grass vs tree, water vs sky) apart.
    Input: (N, 3, H, W) float in [-1, 1] with H, W multiples of 4; output: (N, n_classes, H, W) logits.
    """

    def __init__(self, n_classes: int, channels: Sequence[int] = (32, 64, 96)) -> None:
        super().__init__()
        c1, c2, c3 = (int(c) for c in channels)
        self.n_classes = int(n_classes)
        self.channels = [c1, c2, c3]
        self.stem = nn.Sequential(conv_block(3, c1), conv_block(c1, c1))
        self.down1 = nn.Sequential(conv_block(c1, c2, stride=2), conv_block(c2, c2))
        self.down2 = nn.Sequential(
            conv_block(c2, c3, stride=2), conv_block(c3, c3, dilation=2), conv_block(c3, c3, dilation=4)
        )
        self.up1 = conv_block(c3 + c2, c2)
        self.up2 = conv_block(c2 + c1, c1)
        self.head = nn.Conv2d(c1, self.n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.stem(x)
        s2 = self.down1(s1)
        h = self.down2(s2)
        h = F.interpolate(h, size=s2.shape[2:], mode="bilinear", align_corners=False)
        h = self.up1(torch.cat([h, s2], 1))
        h = F.interpolate(h, size=s1.shape[2:], mode="bilinear", align_corners=False)
        return self.head(self.up2(torch.cat([h, s1], 1)))


def images_to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (N, 3, H, W) -> float [-1, 1], the datasets' own image scaling (x / 127.5 - 1)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 RGB images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    return images.float() / 127.5 - 1.0


def pad_to_multiple(x: torch.Tensor, multiple: int = 4) -> tuple[torch.Tensor, tuple[int, int]]:
    """Replicate-pad H and W up to a multiple (the decoder's skips must align); returns the original size."""
    height, width = x.shape[2:]
    ph, pw = -height % multiple, -width % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, (height, width)


class SegmenterModule(L.LightningModule):
    """Cross-entropy training of :class:`SegNet` (ignore label honoured), val mIoU on the whole split.

    The validation scores accumulate in torchmetrics' ``MulticlassJaccardIndex`` / ``MulticlassAccuracy``
    (one summed confusion matrix, synchronised across DDP processes at epoch end), which equal
    :func:`segldm.metrics.miou.scores_from_confusion` on the same pixels: classes absent from both
    prediction and target are left out of the mean, ignored pixels are not counted.
    """

    def __init__(
        self,
        net: SegNet,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        ignore_label: int | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {lr}")
        self.net = net
        self.lr = lr
        self.weight_decay = weight_decay
        self.ignore_label = ignore_label
        self.class_names = list(class_names or [])
        self.segldm_config: dict[str, Any] | None = None
        self.val_miou, self.val_pixel_accuracy = validation_metrics(net.n_classes, ignore_label)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, (height, width) = pad_to_multiple(x)
        return self.net(x)[:, :, :height, :width]

    def _inputs(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        image = batch["image"].permute(0, 3, 1, 2).float()
        if "label_map" in batch:
            target = batch["label_map"].long()
        else:
            target = batch["segmentation"].argmax(-1).long()
        return image, target

    def training_step(self, batch: Mapping[str, Any] | None, batch_idx: int) -> torch.Tensor | None:
        if batch is None:  # every sample of the batch was skipped (data.on_error=skip)
            return None
        image, target = self._inputs(batch)
        ignore = -100 if self.ignore_label is None else int(self.ignore_label)
        loss = F.cross_entropy(self(image), target, ignore_index=ignore)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Mapping[str, Any] | None, batch_idx: int) -> None:
        if batch is None:
            return
        image, target = self._inputs(batch)
        prediction = self(image).argmax(1)
        self.val_miou.update(prediction, target)
        self.val_pixel_accuracy.update(prediction, target)
        # logged as metric objects: Lightning computes (and DDP-syncs) them once at the epoch's end
        self.log("val/miou", self.val_miou, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/pixel_accuracy", self.val_pixel_accuracy, on_step=False, on_epoch=True)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else None
        if not total:
            return optimizer
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.lr, total_steps=total + 1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["segldm"] = {"kind": KIND, "config": self.segldm_config}


def validation_metrics(
    n_classes: int, ignore_label: int | None = None
) -> tuple[MulticlassJaccardIndex, MulticlassAccuracy]:
    """Summed-confusion mIoU and pixel accuracy as DDP-safe torchmetrics accumulators."""
    options: dict[str, Any] = {"num_classes": n_classes, "ignore_index": ignore_label, "validate_args": False}
    return (
        MulticlassJaccardIndex(average="macro", **options),
        MulticlassAccuracy(average="micro", multidim_average="global", **options),
    )


def net_config(net: SegNet) -> dict[str, Any]:
    """The constructor arguments a checkpoint stores to rebuild the network."""
    return {"n_classes": net.n_classes, "channels": list(net.channels)}


def segmenter_checkpoint(
    module: SegmenterModule, config: Mapping[str, Any], real_scores: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Compact ``segmenter.ckpt``: the network's weights, its constructor, training config, real mIoU."""
    return {
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "segldm": {
            "kind": KIND,
            "net": net_config(module.net),
            "config": dict(config),
            "real_scores": dict(real_scores or {}),
        },
    }


class TrainedSegmenter:
    """A :class:`SegNet` from a ``segldm.train_segmenter`` checkpoint, labelling uint8 RGB images."""

    def __init__(self, ckpt: str | Path, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        path = Path(ckpt)
        checkpoint = read_checkpoint(path, what="segmenter checkpoint", missing_help=TRAIN_HELP)
        kind = checkpoint_kind(checkpoint)
        if kind != f"segldm-{KIND}":
            raise wrong_kind(path, kind, "a segldm segmenter checkpoint (segldm.train_segmenter)", TRAIN_HELP)
        section = checkpoint["segldm"]
        config = section.get("config") or {}
        net_cfg = section.get("net") or _net_from_config(config, path)
        self.net = SegNet(int(net_cfg["n_classes"]), net_cfg.get("channels", (32, 64, 96)))
        state_dict = state_dict_of(checkpoint, path, "segmenter checkpoint")
        state_dict = {k.removeprefix("net."): v for k, v in state_dict.items() if k.startswith("net.")}
        load_strict(self.net, state_dict, path, "the SegNet its own config builds")
        self.device = torch.device(device)
        self.net.to(self.device).eval()
        self.batch_size = max(1, int(batch_size))
        self.n_classes = self.net.n_classes
        self.path = path
        self.config: dict[str, Any] = dict(config)
        self.real_scores: dict[str, Any] = dict(section.get("real_scores") or {})
        self.name = f"trained SegNet ({path})"
        self.label_map: LabelMap = SameIds(self.n_classes, dontcare_channels=0)  # trained on the dataset's own ids
        self.class_names: list[str] | None = None

    def card(self) -> dict[str, object]:
        """What made this segmenter's labels (recorded with every mIoU)."""
        return {
            "name": "trained SegNet (segldm.train_segmenter)",
            "weights": str(self.path),
            "weights_sha256": file_sha256(self.path),
            "reference": None,
            "preprocessing": {"input": "uint8 / 127.5 - 1, replicate-padded to a multiple of 4"},
            "n_classes": self.n_classes,
            "label_map": self.label_map.description,
            "real_miou_at_training": self.real_scores.get("miou"),
        }

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 RGB -> (N, H, W) int64 labels."""
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            x = images_to_input(images[start : start + self.batch_size]).to(self.device)
            x, (height, width) = pad_to_multiple(x)
            out.append(self.net(x)[:, :, :height, :width].argmax(1).cpu())
        return torch.cat(out)


def _net_from_config(config: Mapping[str, Any], path: Path) -> dict[str, Any]:
    net = config.get("model") if isinstance(config, Mapping) else None
    if not isinstance(net, Mapping) or "n_classes" not in net:
        raise CheckpointError(
            f"{path}: its segldm section holds no network config (model.n_classes); {TRAIN_HELP}"
        )
    return dict(net)


__all__ = [
    "KIND",
    "SegNet",
    "SegmenterModule",
    "TrainedSegmenter",
    "images_to_input",
    "segmenter_checkpoint",
]
