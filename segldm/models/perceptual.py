"""LPIPS (VGG16) for the first stage's perceptual loss, from the ``lpips`` package, offline.

The package ships LPIPS's linear heads; the VGG16 ImageNet backbone it would download is read from
a file instead, tried in this order:

1. ``vgg16_path``: torchvision's ``vgg16`` state_dict (``features.N.*``), an LPIPS state_dict
   (``net.sliceK.N.*``) or a taming/CompVis VQ checkpoint (``loss.perceptual_loss.*``: VGG16 and the
   linear heads it was trained with);
2. the checkpoint the first stage is fine-tuned from, when it holds ``loss.perceptual_loss.*``;
3. torchvision's cache, ``<torch hub dir>/checkpoints/vgg16-397923af.pth``, when present.
 The module layout is taming's ``LPIPS`` (``scaling_layer``,
``net.slice1..5``, ``lin0..4``), so those keys load as they are.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from segldm.errors import MissingFileError

TORCHVISION_VGG16_FILE = "vgg16-397923af.pth"
# torchvision vgg16.features index -> LPIPS slice (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3)
VGG16_SLICES = ((1, range(0, 4)), (2, range(4, 9)), (3, range(9, 16)), (4, range(16, 23)), (5, range(23, 30)))
TAMING_PREFIX = "loss.perceptual_loss."


class PerceptualWeightsError(MissingFileError):
    """No VGG16 backbone for LPIPS; the message names every way to provide one."""


def torchvision_vgg16_cache() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_VGG16_FILE


def find_vgg16_weights(
    vgg16_path: str | Path | None, checkpoint: str | Path | None = None, key: str = "model.loss.vgg16_path"
) -> Path | None:
    """The file LPIPS's backbone comes from (see the module docstring), or None.

    ``checkpoint`` (a first stage being fine-tuned) counts only when it holds LPIPS keys; ``key`` is
    the config key ``vgg16_path`` came from, for the message.
    """
    if vgg16_path is not None:
        path = Path(vgg16_path)
        if not path.is_file():
            raise PerceptualWeightsError(
                f"{key}={vgg16_path}: no such file (a torchvision vgg16 state_dict such as "
                f"{TORCHVISION_VGG16_FILE}, an LPIPS state_dict, or a taming/CompVis VQ checkpoint)"
            )
        return path
    if checkpoint is not None and Path(checkpoint).is_file() and holds_lpips(Path(checkpoint)):
        return Path(checkpoint)
    cached = torchvision_vgg16_cache()
    return cached if cached.is_file() else None


def require_vgg16_weights(
    vgg16_path: str | Path | None, checkpoint: str | Path | None = None, key: str = "model.loss"
) -> Path:
    """:func:`find_vgg16_weights`, or PerceptualWeightsError naming every way to provide the weights
    (LPIPS builds with it; the start-up check asks it before anything is built)."""
    path = find_vgg16_weights(vgg16_path, checkpoint, f"{key}.vgg16_path")
    if path is None:
        raise PerceptualWeightsError(missing_weights_message(key))
    return path


def holds_lpips(path: Path) -> bool:
    """Whether a checkpoint file has taming's ``loss.perceptual_loss.net.*`` keys."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # unreadable here; the first-stage loader reports it with its own message
        return False
    state = state.get("state_dict", state) if isinstance(state, Mapping) else {}
    return any(str(k).startswith(TAMING_PREFIX + "net.") for k in state)


def missing_weights_message(key: str = "model.loss") -> str:
    return (
        f"{key}.perceptual_weight > 0 needs VGG16 ImageNet weights for LPIPS and none were found (this "
        "machine cannot download them). Provide them in one of two ways: (1) "
        f"{key}.vgg16_path=<file>: torchvision's {TORCHVISION_VGG16_FILE}, or a taming/CompVis VQ "
        "checkpoint such as CompVis's vq-f4 model.ckpt (its loss.perceptual_loss.* keys hold VGG16 and "
        f"the LPIPS heads); (2) put {TORCHVISION_VGG16_FILE} in torchvision's cache, {torchvision_vgg16_cache()}. "
        f"Or train without the perceptual term: {key}.perceptual_weight=0"
    )


def lpips_state_from(state: Mapping[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], bool]:
    """LPIPS keys (``net.*``, optionally ``lin*``/``scaling_layer``) from any supported file layout.

    Returns (state, has_heads): whether the file also held the linear heads.
    """
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if any(k.startswith(TAMING_PREFIX) for k in state):
        sub = {k.removeprefix(TAMING_PREFIX): v for k, v in state.items() if k.startswith(TAMING_PREFIX)}
        return sub, any(k.startswith("lin") for k in sub)
    if any(k.startswith("net.slice") for k in state):
        return dict(state), any(k.startswith("lin") for k in state)
    if any(k.startswith("features.") for k in state):
        out: dict[str, torch.Tensor] = {}
        for slice_index, layers in VGG16_SLICES:
            for i in layers:
                for kind in ("weight", "bias"):
                    key = f"features.{i}.{kind}"
                    if key in state:
                        out[f"net.slice{slice_index}.{i}.{kind}"] = state[key]
        return out, False
    raise PerceptualWeightsError(
        f"{source} holds neither torchvision vgg16 keys (features.N.weight), LPIPS keys (net.sliceK.N.weight) "
        f"nor a taming checkpoint's {TAMING_PREFIX}* keys"
    )


class LPIPS(nn.Module):
    """The ``lpips`` package's VGG16 LPIPS (v0.1, linear heads from its wheel), frozen, in eval mode.

    ``vgg16_path``, a fine-tuned ``checkpoint``'s own LPIPS or the torchvision cache fill the backbone
    (see the module docstring); none of them is an error naming every way to provide one.
    """

    def __init__(
        self,
        vgg16_path: str | Path | None = None,
        checkpoint: str | Path | None = None,
        dropout_in_training: bool = True,
    ) -> None:
        super().__init__()
        self.dropout_in_training = dropout_in_training
        import lpips

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchvision's "pretrained" deprecation notice
            model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        # taming's attribute names; lpips' extra `lins` ModuleList holds the same modules as lin0..4
        self.scaling_layer = model.scaling_layer
        self.net = model.net
        self.lin0, self.lin1, self.lin2, self.lin3, self.lin4 = model.lins
        self.backbone_source: str | None = None
        self.load_backbone(require_vgg16_weights(vgg16_path, checkpoint))
        self.eval()
        for param in self.parameters():
            param.requires_grad = False

    def load_backbone(self, path: Path) -> None:
        state, has_heads = lpips_state_from(
            torch.load(path, map_location="cpu", weights_only=True), str(path)
        )
        own = self.state_dict()
        wanted = [k for k in own if k.startswith("net.")] + (
            [k for k in own if k.startswith("lin")] if has_heads else []
        )
        missing = [k for k in wanted if k not in state]
        if missing:
            raise PerceptualWeightsError(f"{path}: VGG16 weights incomplete, missing {missing[:4]}")
        bad = [k for k in wanted if state[k].shape != own[k].shape]
        if bad:
            raise PerceptualWeightsError(
                f"{path}: {bad[0]} has shape {tuple(state[bad[0]].shape)}, LPIPS VGG16 expects {tuple(own[bad[0]].shape)}"
            )
        self.load_state_dict({k: state[k] for k in wanted}, strict=False)
        self.backbone_source = str(path) + (" (with its LPIPS heads)" if has_heads else "")

    def train(self, mode: bool = True) -> LPIPS:
        """Frozen weights, but taming's quirk kept by default: its LPIPS follows the training module's
        mode, so the heads' Dropout(0.5) is active while training (``dropout_in_training: false``: off)."""
        return super().train(mode and self.dropout_in_training)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, 1, 1, 1) LPIPS distance of images in [-1, 1]."""
        a, b = self.net(self.scaling_layer(x)), self.net(self.scaling_layer(y))
        heads = (self.lin0, self.lin1, self.lin2, self.lin3, self.lin4)
        total = 0
        for feat_a, feat_b, head in zip(a, b, heads, strict=True):
            diff = (normalize_tensor(feat_a) - normalize_tensor(feat_b)) ** 2
            total = total + head.model(diff).mean([2, 3], keepdim=True)
        return total


def normalize_tensor(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit length along channels (LPIPS's feature normalisation)."""
    return x / (torch.sqrt(torch.sum(x**2, dim=1, keepdim=True)) + eps)
