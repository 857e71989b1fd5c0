"""Synthetic 3D data for the RANP experiments: segmentation volumes and moving-pattern clips.

Every sample is a pure function of ``(seed, split, index)`` (a ``numpy`` generator seeded with that
triple), so runs are reproducible and every rank or worker sees the same data.

* :class:`VolumesDataset` / :class:`SyntheticVolumes`: noisy volumes holding ellipsoids and boxes; class
  ``k >= 1`` has its own shape kind, mean intensity and stripe texture, class 0 is the background.
  Batches: ``image`` (B, 1, D, H, W) float32, ``mask`` (B, D, H, W) int64, ``index`` (B,) int64.
* :class:`ClipsDataset` / :class:`SyntheticClips`: a smooth two-colour texture translating over the frame;
  the class is the direction of motion (``num_classes`` directions evenly spaced), so a single frame does
  not tell it. Batches: ``image`` (B, 3, T, H, W) float32, ``label`` (B,) int64, ``index`` (B,) int64.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from app.datamodules.common import SplitDataModule

__all__ = [
    "ClipsDataset",
    "SyntheticClips",
    "SyntheticVolumes",
    "VolumesDataset",
    "render_clip",
    "render_volume",
]

SPLITS = {"train": 0, "val": 1, "test": 2}


def _size3(size: int | tuple[int, int, int]) -> tuple[int, int, int]:
    shape = (size,) * 3 if isinstance(size, int) else tuple(size)
    if len(shape) != 3 or any(not isinstance(s, int) or s < 8 for s in shape):
        raise ValueError(f"volume_size must be an int or 3 ints, each >= 8, got {size!r}")
    return shape  # type: ignore[return-value]


def render_volume(
    rng: np.random.Generator, shape: tuple[int, int, int], num_classes: int, noise_std: float
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one segmentation volume.

    Every foreground class gets one object, then up to two more random objects are added; later
    objects are drawn over earlier ones. Odd classes are ellipsoids, even classes boxes; class ``k``
    has mean intensity ``0.25 + 0.75 k / (C - 1)`` and stripes of its own frequency; a smooth bias field
    and Gaussian noise of ``noise_std`` are added.

    Returns:
        image: (D, H, W) float32; mask: (D, H, W) int64 in [0, num_classes).
    """
    d, h, w = shape
    z, y, x = np.meshgrid(
        np.arange(d, dtype=np.float32),
        np.arange(h, dtype=np.float32),
        np.arange(w, dtype=np.float32),
        indexing="ij",
    )
    mask = np.zeros(shape, dtype=np.int64)
    classes = list(rng.permutation(np.arange(1, num_classes))) + list(
        rng.integers(1, num_classes, rng.integers(0, 3))
    )
    size = np.array(shape, dtype=np.float32)
    for k in classes:
        center = rng.uniform(0.2, 0.8, 3) * size
        radii = rng.uniform(0.15, 0.3, 3) * size
        u = [(c - c0) / r for c, c0, r in zip((z, y, x), center, radii)]
        if k % 2:
            inside = u[0] ** 2 + u[1] ** 2 + u[2] ** 2 <= 1.0
        else:
            inside = np.maximum(np.maximum(np.abs(u[0]), np.abs(u[1])), np.abs(u[2])) <= 1.0
        mask[inside] = k
    means = np.concatenate([[0.0], 0.25 + 0.75 * np.arange(1, num_classes) / max(num_classes - 1, 1)])
    frequency = 0.15 + 0.1 * np.arange(num_classes)
    phase = rng.uniform(0, 2 * math.pi)
    texture = 0.1 * np.sin(frequency[mask] * (x + y + z) + phase)
    bias = 0.1 * np.sin(2 * math.pi * (z / d + rng.uniform())) * np.cos(2 * math.pi * (x / w + rng.uniform()))
    image = means[mask] + texture + bias + rng.normal(0.0, noise_std, shape)
    return image.astype(np.float32), mask


def render_clip(
    rng: np.random.Generator, label: int, num_classes: int, frames: int, size: int, noise_std: float
) -> np.ndarray:
    """Draw one clip: a smooth random two-colour texture translating in direction ``2 pi label / C``.

    The texture is white noise low-passed in the Fourier domain (wavelengths of about ``size / 4`` and
    longer, periodic), so every pixel moves and no single frame tells the direction. It moves 1.5-2.5
    pixels per frame, wrapping around the borders (sub-pixel shifts applied as Fourier phase ramps).

    Returns:
        (3, T, S, S) float32.
    """
    angle = 2 * math.pi * label / num_classes
    speed = rng.uniform(1.5, 2.5)
    frequencies = np.fft.fftfreq(size)
    fy, fx = np.meshgrid(frequencies, frequencies, indexing="ij")
    low_pass = np.exp(-((fy**2 + fx**2) * (size / 6.0) ** 2))
    spectrum = np.fft.fft2(rng.normal(0.0, 1.0, (size, size))) * low_pass
    shifts = speed * np.arange(frames)[:, None, None]  # (T, 1, 1) pixels travelled
    phase = np.exp(-2j * math.pi * shifts * (fy * math.sin(angle) + fx * math.cos(angle)))
    texture = np.fft.ifft2(spectrum[None] * phase).real  # (T, S, S)
    texture = (texture - texture.mean()) / (texture.std() + 1e-8)
    mix = 1.0 / (1.0 + np.exp(-2.0 * texture))  # in (0, 1), sharp-ish blobs
    colour_a = rng.uniform(0.5, 1.0, 3)
    colour_b = rng.uniform(0.0, 0.4, 3)
    clip = colour_b[:, None, None, None] + (colour_a - colour_b)[:, None, None, None] * mix[None]
    clip = clip + rng.normal(0.0, noise_std, clip.shape)
    return clip.astype(np.float32)


class _SyntheticSplit(Dataset):
    """One split of a synthetic dataset; sample ``index`` is drawn by :meth:`_sample` from a generator
    seeded with ``(seed, split, index)``."""

    def __init__(self, split: str, length: int, noise_std: float, seed: int) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.split = split
        self.length = length
        self.noise_std = noise_std
        self.seed = seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        sample = self._sample(np.random.default_rng([self.seed, SPLITS[self.split], index]))
        return {**sample, "index": torch.tensor(index, dtype=torch.long)}

    def _sample(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class VolumesDataset(_SyntheticSplit):
    """One split of synthetic segmentation volumes; sample ``index`` depends only on ``(seed, split, index)``.

    Args:
        split: ``train``, ``val`` or ``test``.
        length: number of samples.
        num_classes: classes including background (2 .. 9).
        volume_size: side length, or ``(D, H, W)``.
        noise_std: Gaussian noise standard deviation.
        seed: data seed.
    """

    def __init__(
        self,
        split: str = "train",
        length: int = 32,
        num_classes: int = 4,
        volume_size: int | tuple[int, int, int] = 32,
        noise_std: float = 0.2,
        seed: int = 0,
    ) -> None:
        super().__init__(split, length, noise_std, seed)
        if not 2 <= num_classes <= 9:
            raise ValueError(f"num_classes must be in [2, 9], got {num_classes}")
        self.num_classes = num_classes
        self.shape = _size3(volume_size)

    def _sample(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        image, mask = render_volume(rng, self.shape, self.num_classes, self.noise_std)
        return {"image": torch.from_numpy(image)[None], "mask": torch.from_numpy(mask)}


class ClipsDataset(_SyntheticSplit):
    """One split of synthetic moving-pattern clips; sample ``index`` depends only on ``(seed, split, index)``.

    Args:
        split: ``train``, ``val`` or ``test``.
        length: number of samples.
        num_classes: number of motion directions (2 .. 16).
        frames: frames per clip.
        frame_size: side length of the square frames.
        noise_std: Gaussian noise standard deviation.
        seed: data seed.
    """

    def __init__(
        self,
        split: str = "train",
        length: int = 64,
        num_classes: int = 8,
        frames: int = 8,
        frame_size: int = 32,
        noise_std: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__(split, length, noise_std, seed)
        if not 2 <= num_classes <= 16:
            raise ValueError(f"num_classes must be in [2, 16], got {num_classes}")
        if frames < 2:
            raise ValueError(f"frames must be >= 2 (motion needs two frames), got {frames}")
        if frame_size < 8:
            raise ValueError(f"frame_size must be >= 8, got {frame_size}")
        self.num_classes = num_classes
        self.frames = frames
        self.frame_size = frame_size

    def _sample(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        label = int(rng.integers(0, self.num_classes))
        clip = render_clip(rng, label, self.num_classes, self.frames, self.frame_size, self.noise_std)
        return {"image": torch.from_numpy(clip), "label": torch.tensor(label, dtype=torch.long)}


class _SyntheticDataModule(SplitDataModule):
    """Loaders over one :class:`_SyntheticSplit` dataset class per split; ``options`` are its arguments
    after ``split`` and ``length``."""

    dataset_class: type[_SyntheticSplit]

    def __init__(
        self,
        sizes: dict[str, int],
        options: dict[str, object],
        batch_size: int,
        val_batch_size: int | None,
        num_workers: int,
        seed: int,
    ) -> None:
        super().__init__(batch_size, val_batch_size, num_workers, seed)
        self.sizes = sizes
        self.options = {**options, "seed": seed}
        self.setup()  # datasets are lazy: building them checks the arguments now

    def _make(self, split: str) -> _SyntheticSplit:
        return self.dataset_class(split, self.sizes[split], **self.options)


class SyntheticVolumes(_SyntheticDataModule):
    """Synthetic 3D segmentation volumes (see :func:`render_volume`) for the 3D-UNet experiments.

    Batches: ``image`` (B, 1, D, H, W), ``mask`` (B, D, H, W), ``index`` (B,).

    Args:
        num_classes: classes including background (2 .. 9).
        volume_size: side length (thesis: 64) or ``(D, H, W)``.
        n_train, n_val, n_test: split sizes.
        noise_std: Gaussian noise standard deviation (class means are 0.75 / (C - 1) apart).
        batch_size: training batch size.
        val_batch_size: batch size of val / test (None: ``batch_size``).
        num_workers: DataLoader workers.
        seed: data and shuffling seed.
    """

    dataset_class = VolumesDataset

    def __init__(
        self,
        num_classes: int = 4,
        volume_size: int = 32,
        n_train: int = 64,
        n_val: int = 16,
        n_test: int = 16,
        noise_std: float = 0.2,
        batch_size: int = 2,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        self.num_classes = num_classes
        self.volume_size = volume_size
        self.noise_std = noise_std
        self.class_names = ["background"] + [
            f"{'ellipsoid' if k % 2 else 'box'} {k}" for k in range(1, max(num_classes, 1))
        ]
        options = {"num_classes": num_classes, "volume_size": volume_size, "noise_std": noise_std}
        sizes = {"train": n_train, "val": n_val, "test": n_test}
        super().__init__(sizes, options, batch_size, val_batch_size, num_workers, seed)


class SyntheticClips(_SyntheticDataModule):
    """Synthetic moving-pattern clips (see :func:`render_clip`) for MobileNetV2-3D and I3D.

    Batches: ``image`` (B, 3, T, H, W), ``label`` (B,), ``index`` (B,).

    Args:
        num_classes: motion directions (2 .. 16).
        frames: frames per clip (thesis: 16).
        frame_size: frame side length.
        n_train, n_val, n_test: split sizes.
        noise_std: Gaussian noise standard deviation.
        batch_size: training batch size.
        val_batch_size: batch size of val / test (None: ``batch_size``).
        num_workers: DataLoader workers.
        seed: data and shuffling seed.
    """

    dataset_class = ClipsDataset

    def __init__(
        self,
        num_classes: int = 8,
        frames: int = 8,
        frame_size: int = 32,
        n_train: int = 256,
        n_val: int = 64,
        n_test: int = 64,
        noise_std: float = 0.1,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        self.num_classes = num_classes
        self.frames = frames
        self.frame_size = frame_size
        self.noise_std = noise_std
        self.class_names = [f"motion {round(360 * k / max(num_classes, 1))} deg" for k in range(num_classes)]
        options = {
            "num_classes": num_classes,
            "frames": frames,
            "frame_size": frame_size,
            "noise_std": noise_std,
        }
        sizes = {"train": n_train, "val": n_val, "test": n_test}
        super().__init__(sizes, options, batch_size, val_batch_size, num_workers, seed)
