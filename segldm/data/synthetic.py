"""Built-in data: procedural landscape scenes with exact segmentation masks, made on the fly.

Every class has its own colour and texture (sky gradient, cloud, striped mountain, speckled grass,
tree discs, rippled water, sand, sun), and the layout (horizon, ridge, ground bands, objects) is
drawn per sample from a generator seeded by (seed, index). The same index always gives the same
sample, so the dataset needs no files, and a model that learns it must put each texture where
the mask says.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from segldm.data.transforms import one_hot as label_one_hot

CLASS_NAMES = ("sky", "cloud", "mountain", "grass", "tree", "water", "sand", "sun")
N_CLASSES = len(CLASS_NAMES)
SKY, CLOUD, MOUNTAIN, GRASS, TREE, WATER, SAND, SUN = range(N_CLASSES)

# Base colours (RGB uint8), also the palette used to draw masks of this dataset.
CLASS_COLORS = np.array(
    [
        (100, 160, 235),  # sky
        (245, 245, 250),  # cloud
        (120, 105, 125),  # mountain
        (70, 160, 55),  # grass
        (25, 85, 35),  # tree
        (30, 75, 170),  # water
        (225, 200, 135),  # sand
        (255, 215, 40),  # sun
    ],
    dtype=np.float32,
)


def make_scene(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (image uint8 HxWx3, labels uint8 HxW) drawn from `rng`."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    labels = np.full((size, size), SKY, dtype=np.uint8)

    horizon = rng.uniform(0.35, 0.6)
    if rng.random() < 0.5:  # sun: drawn first so mountains and clouds may cover it
        cx, cy, r = rng.uniform(0.15, 0.85), rng.uniform(0.08, horizon - 0.15), rng.uniform(0.06, 0.1)
        labels[(xs - cx) ** 2 + (ys - cy) ** 2 < r**2] = SUN
    for _ in range(rng.integers(0, 3)):
        cx, cy = rng.uniform(0.0, 1.0), rng.uniform(0.05, horizon - 0.12)
        rx, ry = rng.uniform(0.1, 0.22), rng.uniform(0.04, 0.07)
        labels[((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 < 1] = CLOUD
    if rng.random() < 0.75:
        amp = rng.uniform(0.1, 0.25)
        f1, f2 = rng.uniform(1.0, 3.0), rng.uniform(3.0, 7.0)
        p1, p2 = rng.uniform(0, 2 * np.pi, size=2)
        ridge = horizon - amp * (
            0.6 + 0.25 * np.sin(2 * np.pi * f1 * xs + p1) + 0.15 * np.sin(2 * np.pi * f2 * xs + p2)
        )
        labels[(ys >= ridge) & (ys < horizon)] = MOUNTAIN

    near, far = rng.choice([GRASS, WATER, SAND], size=2, replace=False)
    boundary = rng.uniform(horizon + 0.1, 0.9) + 0.05 * np.sin(
        2 * np.pi * rng.uniform(0.5, 2) * xs + rng.uniform(0, 6)
    )
    ground = ys >= horizon
    labels[ground] = far
    labels[ground & (ys >= boundary)] = near
    for _ in range(rng.integers(0, 4)):
        cx, cy, r = rng.uniform(0.05, 0.95), rng.uniform(horizon + 0.05, 0.95), rng.uniform(0.05, 0.1)
        disc = (xs - cx) ** 2 + (ys - cy) ** 2 < r**2
        labels[disc & (labels == GRASS)] = TREE

    image = _paint(labels, xs, ys, horizon, rng)
    return image, labels


def _paint(
    labels: np.ndarray, xs: np.ndarray, ys: np.ndarray, horizon: float, rng: np.random.Generator
) -> np.ndarray:
    """Colour each class with its base colour times a class-specific texture."""
    size = labels.shape[0]
    image = CLASS_COLORS[labels].copy()
    shade = np.ones_like(xs)
    sky_mix = np.clip(ys / max(horizon, 1e-3), 0, 1)[..., None]
    sky = CLASS_COLORS[SKY] * (1 - sky_mix) + np.array([200, 220, 245], np.float32) * sky_mix
    image = np.where((labels == SKY)[..., None], sky, image)
    phase = rng.uniform(0, 2 * np.pi)
    shade = np.where(labels == MOUNTAIN, 0.8 + 0.2 * np.sign(np.sin(2 * np.pi * 10 * xs + phase)), shade)
    shade = np.where(labels == WATER, 0.85 + 0.25 * np.sin(2 * np.pi * 12 * ys + phase) ** 2, shade)
    speckle = rng.random((size, size)).astype(np.float32)
    shade = np.where(labels == GRASS, 0.8 + 0.35 * speckle, shade)
    shade = np.where(labels == SAND, 0.92 + 0.12 * speckle, shade)
    shade = np.where(labels == TREE, 0.7 + 0.6 * (speckle > 0.7), shade)
    image = image * shade[..., None] + rng.normal(0, 3.0, size=image.shape).astype(np.float32)
    return np.clip(image, 0, 255).round().astype(np.uint8)


def nearest_color_labels(image: np.ndarray) -> np.ndarray:
    """Label each pixel of an (H, W, 3) uint8 scene by the nearest class base colour.

    A free, training-free labeller for the built-in data: real scenes score well above chance
    with it, so it tells at a glance whether generated regions follow their masks.
    """
    dist = ((image[:, :, None, :].astype(np.float32) - CLASS_COLORS[None, None]) ** 2).sum(-1)
    return dist.argmin(-1).astype(np.uint8)


class SyntheticScenes(Dataset):
    """Deterministic procedural scenes in the SFLCKR sample format.

    Sample keys: `image` (H, W, 3) float32 in [-1, 1], `label_map` (H, W) uint8, `index`, and with
    `one_hot` (the reference format; training configs turn it off and let the model expand the
    label map on its device) `segmentation` (H, W, n_labels) float32 one-hot.
    """

    n_labels = N_CLASSES
    fixed_samples = True  # sample i is the same every read: LDM latents may be cached
    class_names = CLASS_NAMES

    def __init__(self, size: int = 64, length: int = 1000, seed: int = 0, one_hot: bool = True) -> None:
        if size <= 0 or length <= 0:
            raise ValueError(
                f"synthetic data needs size > 0 and length > 0, got size={size}, length={length}"
            )
        self.size = size
        self.length = length
        self.seed = seed
        self.one_hot = one_hot
        # each scene is drawn once per process: epochs after the first read it back (uint8, ~16 kB
        # per 64 px scene; the quickstart LDM's data loading was ~7 % of its step before)
        self.drawn: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Scene ``index`` (uint8 image, uint8 labels): the same arrays' values on every read."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} synthetic scenes")
        if index not in self.drawn:
            image, labels = make_scene(self.size, np.random.default_rng([self.seed, index]))
            image.flags.writeable = labels.flags.writeable = False  # shared by every later read
            self.drawn[index] = (image, labels)
        return self.drawn[index]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        image, labels = self.scene(index)
        sample: dict[str, torch.Tensor | int] = {
            "image": torch.from_numpy(image.astype(np.float32) / 127.5 - 1.0),
            "label_map": torch.from_numpy(labels.copy()),
            "index": index,
        }
        if self.one_hot:
            sample["segmentation"] = torch.from_numpy(label_one_hot(labels, N_CLASSES))
        return sample
