"""taming-transformers' PatchGAN discriminator (``NLayerDiscriminator``) and its ActNorm.

Layer order, names and initialisation follow ``taming.modules.discriminator.model`` so that a
taming/CompVis VQ checkpoint's ``loss.discriminator.*`` tensors load strictly.
"""

from __future__ import annotations

import torch
from torch import nn

KERNEL_SIZE = 4
PADDING = 1


class ActNorm(nn.Module):
    """Per-channel affine layer initialised from the first training batch (data-dependent init).

    ``initialized`` is a buffer, so a checkpoint written after the first batch restores it as is.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        self.loc.copy_(-flat.mean(1).view(1, -1, 1, 1))
        self.scale.copy_(1 / (flat.std(1).view(1, -1, 1, 1) + 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.initialized.item() == 0:
            self.initialize(x)
            self.initialized.fill_(1)
        return self.scale * (x + self.loc)


def weights_init(module: nn.Module) -> None:
    """taming's init: convs N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0."""
    name = module.__class__.__name__
    if "Conv" in name:
        nn.init.normal_(module.weight.data, 0.0, 0.02)
    elif "BatchNorm" in name:
        nn.init.normal_(module.weight.data, 1.0, 0.02)
        nn.init.constant_(module.bias.data, 0)


class NLayerDiscriminator(nn.Module):
    """PatchGAN (pix2pix): ``n_layers`` stride-2 4x4 convs, one stride-1, then a 1-channel logit map.

    Each output logit sees a patch of the image (70 px for n_layers=3); an image must be at least
    :func:`min_input_size` pixels on a side for the logit map to be non-empty.
    """

    def __init__(
        self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False
    ) -> None:
        super().__init__()
        problem = depth_problem(n_layers)
        if problem:
            raise ValueError(problem)
        norm_layer = ActNorm if use_actnorm else nn.BatchNorm2d
        use_bias = use_actnorm  # BatchNorm's affine shift makes a conv bias redundant
        sequence: list[nn.Module] = [
            nn.Conv2d(input_nc, ndf, kernel_size=KERNEL_SIZE, stride=2, padding=PADDING),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers):
            previous, mult = mult, min(2**n, 8)
            sequence += [
                nn.Conv2d(ndf * previous, ndf * mult, KERNEL_SIZE, stride=2, padding=PADDING, bias=use_bias),
                norm_layer(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        previous, mult = mult, min(2**n_layers, 8)
        sequence += [
            nn.Conv2d(ndf * previous, ndf * mult, KERNEL_SIZE, stride=1, padding=PADDING, bias=use_bias),
            norm_layer(ndf * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * mult, 1, KERNEL_SIZE, stride=1, padding=PADDING),
        ]
        self.main = nn.Sequential(*sequence)
        self.n_layers = n_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def output_size(size: int, n_layers: int) -> int:
    """Side of the logit map for a ``size`` px input (each 4x4 conv with padding 1: stride 2 halves
    (floor), the two stride-1 convs each remove one pixel)."""
    for _ in range(n_layers):
        size = (size + 2 * PADDING - KERNEL_SIZE) // 2 + 1
    for _ in range(2):
        size = size + 2 * PADDING - KERNEL_SIZE + 1
    return size


def min_input_size(n_layers: int) -> int:
    """Smallest image side that gives a logit map of at least 1 x 1."""
    size = 1
    while output_size(size, n_layers) < 1:
        size += 1
    return size


def depth_problem(n_layers: int, key: str = "disc_num_layers") -> str | None:
    """Why ``n_layers`` builds no PatchGAN (``key``: the setting it came from), or None."""
    return f"{key}={n_layers} must be >= 1" if n_layers < 1 else None


def image_size_problem(n_layers: int, size: int, key: str, size_key: str = "data.size") -> str | None:
    """Why ``size`` px images are too small for an ``n_layers`` PatchGAN (empty logit map), with the
    depth that fits them if there is one, or None."""
    if n_layers < 1 or size >= min_input_size(n_layers):
        return None
    fitting = max((n for n in range(1, n_layers) if size >= min_input_size(n)), default=None)
    return (
        f"{key}={n_layers}: the PatchGAN needs images of at least {min_input_size(n_layers)} px but "
        f"{size_key}={size}; use "
        + (f"{key}={fitting} or " if fitting else "")
        + f"{size_key}>={min_input_size(n_layers)}"
    )
