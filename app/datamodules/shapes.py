"""SyntheticShapes: the embedded default 2D segmentation dataset.

Each image holds a few textured shapes (class = shape kind) on a textured background, blurred and
corrupted with spatially varying Gaussian noise. Every sample is a pure function of
``(seed, split, index)``: it is drawn from a ``numpy.random.Generator`` seeded with those three
numbers, never from a global RNG.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter, zoom

from app.datamodules.common import SegmentationDataModule, SegmentationDataset

SHAPE_KINDS: tuple[str, ...] = ("disc", "square", "triangle", "ring", "star", "cross", "ellipse", "hexagon")
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}

# Per-class appearance (index 0 = class 1): mean RGB colour and stripe frequency (cycles / pixel).
# The colours are close enough that the per-instance jitter makes them overlap.
_CLASS_COLOURS = np.array(
    [
        [0.75, 0.35, 0.30],
        [0.35, 0.65, 0.35],
        [0.35, 0.40, 0.75],
        [0.70, 0.65, 0.30],
        [0.60, 0.35, 0.65],
        [0.30, 0.65, 0.65],
        [0.75, 0.50, 0.45],
        [0.45, 0.45, 0.45],
    ],
    dtype=np.float64,
)
_CLASS_STRIPES = np.array([0.06, 0.12, 0.20, 0.09, 0.16, 0.25, 0.04, 0.14], dtype=np.float64)


def _shape_mask(kind: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of a shape of circumradius ``r`` in local (rotated, centred) coordinates ``u, v``."""
    dist = np.hypot(u, v)
    if kind == "disc":
        return dist <= r
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.75 * r
    if kind == "triangle":
        angles = -np.pi / 2 + 2 * np.pi * np.arange(3) / 3
        return np.all([u * np.cos(a) + v * np.sin(a) <= 0.5 * r for a in angles], axis=0)
    if kind == "ring":
        return (dist <= r) & (dist >= 0.55 * r)
    if kind == "star":
        return dist <= r * (0.6 + 0.4 * np.cos(5 * np.arctan2(v, u)))
    if kind == "cross":
        return ((np.abs(u) <= 0.3 * r) & (np.abs(v) <= r)) | ((np.abs(v) <= 0.3 * r) & (np.abs(u) <= r))
    if kind == "ellipse":
        return (u / r) ** 2 + (v / (0.5 * r)) ** 2 <= 1.0
    if kind == "hexagon":
        angles = np.pi * np.arange(6) / 3
        return np.all([u * np.cos(a) + v * np.sin(a) <= 0.87 * r for a in angles], axis=0)
    raise ValueError(f"unknown shape kind {kind!r}; known: {SHAPE_KINDS}")


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size) smooth random field in [0, 1]: a ``cells x cells`` grid upsampled bicubically."""
    coarse = rng.random((cells, cells))
    field = zoom(coarse, size / cells, order=3, mode="nearest")[:size, :size]
    lo, hi = field.min(), field.max()
    return (field - lo) / (hi - lo + 1e-12)


def _stripes(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, frequency: float) -> np.ndarray:
    """(H, W) sinusoidal stripes in [-1, 1] with random orientation and phase."""
    angle = rng.uniform(0, np.pi)
    phase = rng.uniform(0, 2 * np.pi)
    return np.sin(2 * np.pi * frequency * (x * np.cos(angle) + y * np.sin(angle)) + phase)


def render_shapes(
    rng: np.random.Generator, num_classes: int, image_size: int, noise_std: float, blur_sigma: float
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one synthetic image and its label map.

    Args:
        rng: the sample's random generator (all randomness comes from it).
        num_classes: classes including background (2 .. 1 + len(SHAPE_KINDS)).
        image_size: side length S.
        noise_std: base standard deviation of the additive Gaussian noise (scaled per region by 0.25 .. 2).
        blur_sigma: Gaussian blur sigma in pixels applied before the noise (0: none).

    Returns:
        image: (S, S, 3) uint8; mask: (S, S) uint8 class ids (0 = background).
    """
    s = image_size
    y, x = np.mgrid[0:s, 0:s].astype(np.float64)

    # Background: random colour, smooth blotches, faint stripes of a random frequency.
    bg_colour = rng.uniform(0.2, 0.8, size=3)
    blotches = _smooth_field(rng, s, 4) - 0.5
    image = bg_colour + 0.35 * blotches[..., None] * rng.uniform(0.5, 1.0, size=3)
    image = image + 0.08 * _stripes(rng, x, y, rng.uniform(0.03, 0.25))[..., None]
    mask = np.zeros((s, s), dtype=np.uint8)

    n_shapes = int(rng.integers(2, 7))
    for _ in range(n_shapes):
        cls = int(rng.integers(1, num_classes))
        r = rng.uniform(0.08, 0.2) * s
        cx, cy = rng.uniform(0.1, 0.9, size=2) * s
        theta = rng.uniform(0, 2 * np.pi)
        u = (x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)
        v = -(x - cx) * np.sin(theta) + (y - cy) * np.cos(theta)
        region = _shape_mask(SHAPE_KINDS[cls - 1], u, v, r)
        colour = _CLASS_COLOURS[cls - 1] + rng.normal(0.0, 0.12, size=3)
        frequency = _CLASS_STRIPES[cls - 1] * rng.uniform(0.8, 1.25)
        texture = rng.uniform(0.05, 0.18) * _stripes(rng, x, y, frequency)
        shading = 0.15 * (_smooth_field(rng, s, 3) - 0.5)
        appearance = colour + (texture + shading)[..., None]
        image[region] = appearance[region]
        mask[region] = cls

    if blur_sigma > 0:
        image = gaussian_filter(image, sigma=(blur_sigma, blur_sigma, 0))
    noise_level = noise_std * (0.25 + 1.75 * _smooth_field(rng, s, 3) ** 2)
    image = image + noise_level[..., None] * rng.normal(size=(s, s, 3))
    image = np.clip(image, 0.0, 1.0)
    return np.round(image * 255).astype(np.uint8), mask


class ShapesDataset(SegmentationDataset):
    """One split of SyntheticShapes; sample ``index`` is a pure function of ``(seed, split, index)``.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        length: number of samples.
        num_classes, image_size, seed, noise_std, blur_sigma: see :class:`SyntheticShapes`.
        cache: keep generated images in memory (per process).
        **kwargs: passed to :class:`SegmentationDataset` (augmentations, superpixels, edges, ...).
    """

    def __init__(
        self,
        split: str,
        length: int,
        num_classes: int,
        image_size: int,
        seed: int,
        noise_std: float,
        blur_sigma: float,
        cache: bool = True,
        **kwargs: Any,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        super().__init__(seed=seed + SPLITS[split], **kwargs)
        self.split = split
        self.length = length
        self.num_classes = num_classes
        self.image_size = image_size
        self.data_seed = seed
        self.noise_std = noise_std
        self.blur_sigma = blur_sigma
        self.cache = cache
        self._images: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.length

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """image: (S, S, 3) uint8, mask: (S, S) uint8 for sample ``index``."""
        if index in self._images:
            return self._images[index]
        rng = np.random.default_rng([self.data_seed, SPLITS[self.split], index])
        sample = render_shapes(rng, self.num_classes, self.image_size, self.noise_std, self.blur_sigma)
        if self.cache:
            self._images[index] = sample
        return sample


class SyntheticShapes(SegmentationDataModule):
    """Synthetic textured shapes on textured backgrounds, blurred and noisy.

    Class ``k >= 1`` is the shape kind ``SHAPE_KINDS[k - 1]`` (disc, square, triangle, ring, ...), each with
    its own but overlapping colour and stripe-texture statistics; class 0 is the background. Several
    shapes per image, later ones drawn on top. The noise strength varies smoothly over the image, so
    errors gather on boundaries and in noisy regions. Images are generated lazily.

    Batches follow the contract of :mod:`app.datamodules.common`. ``predict`` uses the test split.

    Args:
        num_classes: classes including background (2 .. 9).
        image_size: side length of the square images.
        n_train, n_val, n_test: split sizes.
        seed: data seed (also seeds shuffling and augmentation).
        noise_std: base standard deviation of the additive Gaussian noise (image range [0, 1]).
        blur_sigma: Gaussian blur sigma in pixels (0: none).
        batch_size: training batch size.
        num_workers: DataLoader workers.
        train_augmentations: albumentations config dicts for training, e.g.
            ``[{"name": "HorizontalFlip", "p": 0.5}]``.
        val_augmentations: same for val / test / predict.
        superpixels: SLIC ``n_segments`` for a ``superpixels`` batch key, or None.
        edges: add a Canny ``edges`` batch key.
        edge_sigma: Canny smoothing sigma.
        superpixel_compactness: SLIC compactness.
        superpixel_sigma: Gaussian smoothing before SLIC (pixels).
        val_batch_size: batch size of val / test / predict (None: ``batch_size``).
        cache: keep generated images in memory.
    """

    def __init__(
        self,
        num_classes: int = 4,
        image_size: int = 96,
        n_train: int = 512,
        n_val: int = 128,
        n_test: int = 128,
        seed: int = 0,
        noise_std: float = 0.1,
        blur_sigma: float = 1.0,
        batch_size: int = 16,
        num_workers: int = 0,
        train_augmentations: list[dict[str, Any]] | None = None,
        val_augmentations: list[dict[str, Any]] | None = None,
        superpixels: int | None = None,
        edges: bool = False,
        edge_sigma: float = 1.0,
        superpixel_compactness: float = 10.0,
        superpixel_sigma: float = 1.0,
        val_batch_size: int | None = None,
        cache: bool = True,
    ) -> None:
        super().__init__(batch_size, val_batch_size, num_workers, seed)
        if not 2 <= num_classes <= len(SHAPE_KINDS) + 1:
            raise ValueError(f"num_classes must be in [2, {len(SHAPE_KINDS) + 1}], got {num_classes}")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            if n < 1:
                raise ValueError(f"{name} must be >= 1, got {n}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        if blur_sigma < 0:
            raise ValueError(f"blur_sigma must be >= 0, got {blur_sigma}")
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.class_names: list[str] = ["background", *SHAPE_KINDS[: num_classes - 1]]
        self.image_size = image_size
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.noise_std = noise_std
        self.blur_sigma = blur_sigma
        self.augmentations = {
            "train": train_augmentations,
            "val": val_augmentations,
            "test": val_augmentations,
        }
        self.superpixels = superpixels
        self.edges = edges
        self.edge_sigma = edge_sigma
        self.superpixel_compactness = superpixel_compactness
        self.superpixel_sigma = superpixel_sigma
        self.cache = cache
        # Build once so that bad augmentation configs fail at construction.
        for split in ("train", "val"):
            self._make(split)

    def _make(self, split: str) -> ShapesDataset:
        return ShapesDataset(
            split,
            self.sizes[split],
            self.num_classes,
            self.image_size,
            self.seed,
            self.noise_std,
            self.blur_sigma,
            cache=self.cache,
            augmentations=self.augmentations[split],
            superpixels=self.superpixels,
            edges=self.edges,
            edge_sigma=self.edge_sigma,
            superpixel_compactness=self.superpixel_compactness,
            superpixel_sigma=self.superpixel_sigma,
            where=f"{'train' if split == 'train' else 'val'}_augmentations",
        )
